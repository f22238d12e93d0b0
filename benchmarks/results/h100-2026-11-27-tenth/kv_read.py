"""How fast can K/V be read in each access pattern? A kernel that only sums the K and V rows
of every request (gathered through slot indices, 256 requests of 100-2,048 tokens, Qwen3-0.6B
heads: 8 KV heads x 128, bf16), against a plain streaming sum of the same bytes."""
import itertools
import random

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def per_head(k_ptr, v_ptr, indptr, idx, out, s_slot, s_head, BLOCK_N: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0)
    r = tl.program_id(1)
    start = tl.load(indptr + r)
    n = tl.load(indptr + r + 1) - start
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for j in range(0, n, BLOCK_N):
        t = j + tl.arange(0, BLOCK_N)
        m = t < n
        slot = tl.load(idx + start + t, mask=m, other=0)
        off = slot[:, None] * s_slot + h * s_head + d[None, :]
        acc += tl.load(k_ptr + off, mask=m[:, None], other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + off, mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(out + (r * 8 + h), tl.sum(acc))


@triton.jit
def all_heads(k_ptr, v_ptr, indptr, idx, out, s_slot, S, BLOCK_N: tl.constexpr, W: tl.constexpr):
    r = tl.program_id(0)
    sp = tl.program_id(1)
    start = tl.load(indptr + r)
    n_all = tl.load(indptr + r + 1) - start
    piece = tl.cdiv(tl.cdiv(n_all, S), BLOCK_N) * BLOCK_N
    lo = sp * piece
    n = tl.minimum(lo + piece, n_all)
    w = tl.arange(0, W)
    acc = tl.zeros([BLOCK_N, W], dtype=tl.float32)
    for j in range(lo, n, BLOCK_N):
        t = j + tl.arange(0, BLOCK_N)
        m = t < n
        slot = tl.load(idx + start + t, mask=m, other=0)
        off = slot[:, None] * s_slot + w[None, :]
        acc += tl.load(k_ptr + off, mask=m[:, None], other=0.0).to(tl.float32)
        acc += tl.load(v_ptr + off, mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(out + r * S + sp, tl.sum(acc))


dev = "cuda"
rng = random.Random(0)
for name, lens in (("b256 100-2048", [rng.randint(100, 2048) for _ in range(256)]),
                   ("b64 800-2048", [rng.randint(800, 2048) for _ in range(64)])):
    total = sum(lens)
    k = torch.randn(total + 1, 8, 128, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    kh = k.transpose(0, 1).contiguous()  # head-major [8, slots, 128]
    vh = v.transpose(0, 1).contiguous()
    indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64, device=dev)
    idx = torch.arange(1, total + 1, dtype=torch.int64, device=dev)
    out = torch.empty(len(lens) * 64, dtype=torch.float32, device=dev)
    nbytes = 2 * 2 * total * 8 * 128
    res = {}
    res["stream sum"] = do_bench_cudagraph(lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32)), rep=200)
    for bn, nw, ns in ((64, 4, 2), (128, 4, 2), (128, 8, 3), (64, 4, 4)):
        res[f"per-head slot-major bn{bn} w{nw} s{ns}"] = do_bench_cudagraph(lambda: per_head[(8, len(lens))](
            k, v, indptr, idx, out, k.stride(0), k.stride(1), BLOCK_N=bn, D=128, num_warps=nw, num_stages=ns), rep=200)
        res[f"per-head head-major bn{bn} w{nw} s{ns}"] = do_bench_cudagraph(lambda: per_head[(8, len(lens))](
            kh, vh, indptr, idx, out, kh.stride(1), kh.stride(0), BLOCK_N=bn, D=128, num_warps=nw, num_stages=ns), rep=200)
    for S in (2048 // len(lens), 4096 // len(lens)):
        for bn, nw, ns in ((16, 4, 2), (16, 8, 2), (32, 8, 2), (8, 4, 3)):
            res[f"all-heads slot-major S{S} bn{bn} w{nw} s{ns}"] = do_bench_cudagraph(lambda: all_heads[(len(lens), S)](
                k, v, indptr, idx, out, k.stride(0), S, BLOCK_N=bn, W=1024, num_warps=nw, num_stages=ns), rep=200)
    for label, ms in res.items():
        print(f"{name:14s} {label:40s} {ms*1e3:7.1f} us  {nbytes/ms/1e9:5.2f} TB/s", flush=True)
