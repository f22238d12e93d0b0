"""Decode attention: per-row slices (spread 1) against slices cut to the batch's mean length
(spread 2-4), on the offline workload's batch shapes (ragged) and equal-length batches."""
import itertools
import random

import torch
from triton.testing import do_bench_cudagraph

from backend.sglang.kernels.triton.decode_attention import choose_num_splits, decode_attention

dev = torch.device("cuda")
rng = random.Random(0)
cases = [
    ("b256 100-2048", [rng.randint(100, 2048) for _ in range(256)]),
    ("b160 300-2048", [rng.randint(300, 2048) for _ in range(160)]),
    ("b120 400-2048", [rng.randint(400, 2048) for _ in range(120)]),
    ("b90 600-2048", [rng.randint(600, 2048) for _ in range(90)]),
    ("b53 800-2048", [rng.randint(800, 2048) for _ in range(53)]),
    ("b21 1100-2048", [rng.randint(1100, 2048) for _ in range(21)]),
    ("b8 1200-2048", [rng.randint(1200, 2048) for _ in range(8)]),
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
    splits = choose_num_splits(len(lens), 8, 40960, dev)
    ref = decode_attention(q, k, v, indptr, idx, 0.088, splits)
    nbytes = 2 * 2 * total * 8 * 128
    row = []
    for label, ns, sp in (("now", splits, 1), ("x2 slices", min(32, 2 * splits), 1),
                          ("spread2", splits, 2), ("spread3", splits, 3), ("spread4", splits, 4)):
        out = decode_attention(q, k, v, indptr, idx, 0.088, ns, spread=sp)
        err = (out.float() - ref.float()).abs().max().item()
        ms = do_bench_cudagraph(lambda: decode_attention(q, k, v, indptr, idx, 0.088, ns, spread=sp), rep=200)
        row.append(f"{label} {ms*1e3:6.1f}us {nbytes/ms/1e9:5.2f}TB/s" + (f" ERR {err:.3g}" if err > 0.02 else ""))
    print(f"{name:15s} S={splits:2d} | " + " | ".join(row), flush=True)
