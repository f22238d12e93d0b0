"""Decode attention efficiency against batch size on this card: slices, blocks, sorting."""
import itertools, random, sys
import torch
from triton.testing import do_bench_cudagraph
from backend.sglang.kernels.triton.decode_attention import choose_long_block_splits, decode_attention

dev = torch.device("cuda")
data = torch.empty(2**30, dtype=torch.bfloat16, device=dev)
bare = data.numel() * 2 / (do_bench_cudagraph(lambda: data.sum(), rep=100) / 1000) / 1e12
del data
print(f"bare read {bare:.2f} TB/s")
rng = random.Random(0)
for B in (8, 16, 32, 48, 64, 96, 128, 192, 256):
    lens = [rng.randint(300, 1800) for _ in range(B)]
    total = sum(lens)
    k = torch.randn(total + 1, 8, 128, dtype=torch.bfloat16, device=dev); v = torch.randn_like(k)
    q = torch.randn(B, 16, 128, dtype=torch.bfloat16, device=dev)
    nbytes = 2 * 2 * total * 8 * 128
    res = []
    for order in ("as-is", "sorted"):
        ls = sorted(lens, reverse=True) if order == "sorted" else lens
        indptr = torch.tensor([0, *itertools.accumulate(ls)], dtype=torch.int32, device=dev)
        idx = torch.arange(1, total + 1, dtype=torch.int32, device=dev)
        base = choose_long_block_splits(B, 8, 40960, dev)
        for splits, bn, st in [(base, 128, 2)] + [(s, 128, 2) for s in (1, 2, 3, 4, 6, 8) if s != base] + [(s, 64, None) for s in (1, 2, 4)]:
            f = lambda: decode_attention(q, k, v, indptr, idx, 0.088, splits, block_n=bn, num_stages=st)
            try:
                ms = do_bench_cudagraph(f, rep=30)
            except Exception as e:
                print("fail", B, splits, bn, type(e).__name__); continue
            res.append((ms, order, splits, bn, splits == base and bn == 128 and order == "as-is"))
    dflt = next(r for r in res if r[4])
    best = sorted(res)[:3]
    line = f"B={B:3d} default splits {dflt[2]} {dflt[0]*1e3:7.1f} us {nbytes/dflt[0]/1e9:5.2f} TB/s ({nbytes/dflt[0]/1e9/bare*100:3.0f}%)"
    for ms, order, s, bn, _ in best:
        line += f" | {order} s{s} b{bn} {nbytes/ms/1e9:5.2f} ({dflt[0]/ms:4.2f}x)"
    print(line, flush=True)
