"""Decode attention with and without the longest-first order, at the offline workload's own
batches (all 256 requests, and the even half one engine of two gets), every 100 steps."""
import itertools, random
import torch
from triton.testing import do_bench_cudagraph
from backend.sglang.kernels.triton.decode_attention import choose_long_block_splits, decode_attention, longest_first

dev = torch.device("cuda")
rng = random.Random(0)
reqs = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(256)]
for name, rs in (("all", reqs), ("half", reqs[0::2])):
    tot = {False: 0.0, True: 0.0}
    for t in range(50, 1050, 100):
        lens = [p + t for p, o in rs if o > t]
        if len(lens) < 8:
            continue
        B = len(lens); total = sum(lens)
        k = torch.randn(total + 1, 8, 128, dtype=torch.bfloat16, device=dev); v = torch.randn_like(k)
        q = torch.randn(B, 16, 128, dtype=torch.bfloat16, device=dev)
        idx = torch.randperm(total, device=dev).to(torch.int32) + 1  # slots scattered
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
        s = choose_long_block_splits(B, 8, 40960, dev)
        res = {}
        for ordered in (False, True):
            def f():
                order = longest_first(indptr) if ordered else None
                return decode_attention(q, k, v, indptr, idx, 0.088, s, block_n=128, num_stages=2, row_order=order)
            res[ordered] = do_bench_cudagraph(f, rep=40)
            tot[ordered] += res[ordered] * 100
        nbytes = 4 * total * 8 * 128
        print(f"{name:4s} t={t:4d} B={B:3d} splits {s} plain {res[False]*1e3:6.1f} us ({nbytes/res[False]/1e9:4.2f} TB/s) ordered {res[True]*1e3:6.1f} us  {res[False]/res[True]:5.3f}x", flush=True)
    print(f"{name}: per-layer attention over the run ~{tot[False]:.0f} ms plain, {tot[True]:.0f} ms ordered ({tot[False]/tot[True]:.3f}x)")
