"""Host cost of one launch (no sync): the engine's decode/extend wrappers, raw Triton launches
of their kernels, trivial Triton kernels with 1 and 34 args, and small torch ops."""
import time, torch, triton, triton.language as tl
from backend.sglang.kernels.triton import decode_attention as DA
from backend.sglang.kernels.triton.extend_attention import extend_attention
dev = "cuda"; bf = torch.bfloat16
@triton.jit
def k1(x):
    pass
@triton.jit
def k34(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33):
    pass
def cost(name, fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    print(f"  {name:44s} {dt*1e6:7.1f} us")
B, H, KVH, D, S = 200, 16, 8, 128, 300000
q = torch.randn(B, H, D, device=dev, dtype=bf)
k = torch.randn(S, KVH, D, device=dev, dtype=bf); v = torch.randn_like(k)
lens = torch.full((B,), 600, device=dev)
indptr = torch.zeros(B + 1, dtype=torch.int64, device=dev); indptr[1:] = lens.cumsum(0)
idx = torch.arange(int(indptr[-1]), device=dev)
req = torch.arange(B, device=dev)
ns = DA.choose_num_splits(B, KVH, 600, q.device)
part, lse = DA.split_buffers(q, 2)
x = torch.zeros(4, device=dev)
args34 = [x] * 10 + [1, 2, 3, 4, 5, 6, 7, 8] * 3
print(f"splits={ns}")
cost("k1[(1,)](x)", lambda: k1[(1,)](x))
cost("k34[(1,)](10 tensors, 24 ints)", lambda: k34[(1,)](*args34))
cost("decode_attention (1 split, whole rows)", lambda: DA.decode_attention(q, k, v, indptr, idx, 0.088, 1, block_n=128, num_stages=2, req_ids=req))
cost("decode_attention (2 splits + merge)", lambda: DA.decode_attention(q, k, v, indptr, idx, 0.088, 2, req_ids=req))
cost("decode_slices (2 splits)", lambda: DA.decode_slices(q, k, v, indptr, idx, 0.088, 2, part, lse, req_ids=req))
cost("merge_splits", lambda: DA.merge_splits(part, lse, q.clone() if False else part[:, :, 0].to(bf) if False else q, 2))
cost("split_buffers", lambda: DA.split_buffers(q, 2))
rows = torch.arange(B, device=dev) * 3
big = torch.randn(8192, H, D, device=dev, dtype=bf)
cost("index_select rows of q", lambda: big.index_select(0, rows))
cost("index_copy_ rows", lambda: big.index_copy_(0, rows, q))
cost("torch.empty_like(q)", lambda: torch.empty_like(q))
c34 = k34[(1,)](*args34)
cost("compiled k34 runner (no specialization)", lambda: c34[(1, 1, 1)](*args34))
c1 = k1[(1,)](x)
cost("compiled k1 runner", lambda: c1[(1, 1, 1)](x))
s = torch.cuda.current_stream().cuda_stream
cost("compiled k34 .run direct", lambda: c34.run(1, 1, 1, s, c34.function, c34.packed_metadata, None, None, None, *args34))
