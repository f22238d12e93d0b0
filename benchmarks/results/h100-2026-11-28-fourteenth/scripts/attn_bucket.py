"""Decode attention per graph bucket on offline-like lengths: current launch vs 128-key
blocks (2 stages) at several slice counts. CUDA-graph timing."""
import itertools
import random

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton.decode_attention import choose_num_splits, decode_attention

dev = torch.device("cuda")
rng = random.Random(0)
reqs = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]


def lens_at(batch):
    """Contexts of the running requests at the step where `batch` remain."""
    for t in range(1025):
        run = [i + t for i, o in reqs if o > t]
        if len(run) <= batch:
            return run[:batch] if run else [500]
    return [500]


rows = []
for bucket in (8, 16, 32, 48, 64, 80, 96, 112, 128, 144, 176):
    seq = lens_at(bucket)
    while len(seq) < bucket:
        seq.append(seq[len(seq) % max(1, len(seq))])
    total = sum(seq)
    k = torch.randn(total + 1, 8, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    indptr = torch.tensor([0, *itertools.accumulate(seq)], dtype=torch.int32, device=dev)
    idx = torch.arange(1, total + 1, dtype=torch.int32, device=dev)
    q = torch.randn(bucket, 16, 128, dtype=torch.bfloat16, device=dev)
    nbytes = 2 * 2 * total * 8 * 128
    s0 = choose_num_splits(bucket, 8, 40960, dev)
    ref = decode_attention(q, k, v, indptr, idx, 0.088, s0)
    cands = [("now", s0, 64, None)] if s0 > 1 else [("now", 1, 128, 2)]
    for s in sorted({1, 2, 3, 4, 6, 8, 12, 16} | {s0, max(1, s0 // 2)}):
        if s <= 2 * s0 + 1:
            cands.append((f"b128 S{s}", s, 128, 2))
    out = []
    for name, s, bn, st in cands:
        fn = lambda: decode_attention(q, k, v, indptr, idx, 0.088, s, block_n=bn,  # noqa: E731
                                      num_stages=st)
        err = (fn() - ref).abs().max().item()
        ms = min(do_bench_cudagraph(fn, rep=60) for _ in range(2))
        out.append((ms, name, err))
    now = out[0][0]
    best = min(out)
    line = (f"B{bucket:4d} ctx {min(seq)}-{max(seq)} S0={s0:2d} now {now * 1e3:6.1f}us "
            f"{nbytes / now / 1e9:5.2f}TB/s | " + " ".join(
                f"{n}:{ms * 1e3:.1f}" + ("!" if e > 0.05 else "") for ms, n, e in out[1:])
            + f" | best {best[1]} {now / best[0]:.3f}x")
    print(line, flush=True)
