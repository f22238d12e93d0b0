"""Decode attention with several slices: 64-key blocks (the default launch today) against
128-key blocks, two or three stages, and half the slices."""
import itertools
import random

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton.decode_attention import choose_num_splits, decode_attention

dev = torch.device("cuda")
rng = random.Random(0)
cases = [
    ("b120 400-2048", [rng.randint(400, 2048) for _ in range(120)]),
    ("b90 600-2048", [rng.randint(600, 2048) for _ in range(90)]),
    ("b53 800-2048", [rng.randint(800, 2048) for _ in range(53)]),
    ("b21 1100-2048", [rng.randint(1100, 2048) for _ in range(21)]),
    ("b8 1200-2048", [rng.randint(1200, 2048) for _ in range(8)]),
    ("b1 300", [300]),
    ("b64x1024", [1024] * 64),
    ("b16x2048", [2048] * 16),
]
for name, lens in cases:
    total = sum(lens)
    k = torch.randn(total + 1, 8, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64, device=dev)
    idx = torch.arange(1, total + 1, dtype=torch.int64, device=dev)
    q = torch.randn(len(lens), 16, 128, dtype=torch.bfloat16, device=dev)
    S = choose_num_splits(len(lens), 8, 40960, dev)
    ref = decode_attention(q, k, v, indptr, idx, 0.088, S)
    nbytes = 2 * 2 * total * 8 * 128
    row = []
    for label, ns, kw in (("now", S, {}), ("bn128s2", S, dict(block_n=128, num_stages=2)),
                          ("bn128s2 S/2", max(1, S // 2), dict(block_n=128, num_stages=2)),
                          ("bn128s3", S, dict(block_n=128, num_stages=3)),
                          ("bn64s3", S, dict(block_n=64, num_stages=3)),
                          ("bn128s2w8", S, dict(block_n=128, num_stages=2, num_warps=8))):
        try:
            out = decode_attention(q, k, v, indptr, idx, 0.088, ns, **kw)
            err = (out.float() - ref.float()).abs().max().item()
            ms = do_bench_cudagraph(lambda: decode_attention(q, k, v, indptr, idx, 0.088, ns, **kw), rep=200)
            row.append(f"{label} {ms*1e3:6.1f}us {nbytes/ms/1e9:4.2f}" + (f" ERR {err:.3g}" if err > 0.02 else ""))
        except Exception as exc:
            row.append(f"{label} failed {type(exc).__name__}")
    print(f"{name:14s} S={S:2d} | " + " | ".join(row), flush=True)
