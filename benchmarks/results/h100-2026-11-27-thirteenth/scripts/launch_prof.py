import cProfile, pstats, io, torch
from backend.sglang.kernels.triton import decode_attention as DA
dev = "cuda"; bf = torch.bfloat16
B, H, KVH, D, S = 200, 16, 8, 128, 300000
q = torch.randn(B, H, D, device=dev, dtype=bf)
k = torch.randn(S, KVH, D, device=dev, dtype=bf); v = torch.randn_like(k)
indptr = torch.arange(B + 1, device=dev) * 600
idx = torch.arange(B * 600, device=dev)
req = torch.arange(B, device=dev)
part, lse = DA.split_buffers(q, 2)
def many():
    for _ in range(2000):
        DA.decode_slices(q, k, v, indptr, idx, 0.088, 2, part, lse, req_ids=req)
many(); torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable(); many(); pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue()[:5000])
