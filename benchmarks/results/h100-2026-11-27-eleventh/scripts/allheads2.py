"""Prototype 2: decode attention with one program per (row, slice) covering every KV head,
K and V read as whole token rows ([BLOCK_N, H_KV, D] tiles), scores and outputs on CUDA
cores by broadcast products (no padding of the query group to a tensor-core tile, so the
accumulator is [H_KV, G, D], as small as the per-head kernel's). Timed against the engine's
decode_attention (one program per row, KV head and slice)."""
import itertools
import os
import random
import sys

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.triton.decode_attention import (
    choose_num_splits, decode_attention, merge_splits, split_buffers)


@triton.jit
def _all_heads_kernel(
    q_ptr, k_ptr, v_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_slot, stride_head, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, scale_log2, num_splits,
    H_KV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(kv_indptr_ptr + row)
    seq_len = tl.load(kv_indptr_ptr + row + 1) - start
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    hk = tl.arange(0, H_KV)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = hk[:, None] * G + g[None, :]  # [H_KV, G_PAD]
    g_mask = (g < G)[None, :]
    q = tl.load(q_ptr + row * stride_qt + heads[:, :, None] * stride_qh + d[None, None, :],
                mask=g_mask[:, :, None], other=0.0).to(tl.float32)  # [H_KV, G_PAD, D]
    m_i = tl.full([H_KV, G_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([H_KV, G_PAD], dtype=tl.float32)
    acc = tl.zeros([H_KV, G_PAD, D], dtype=tl.float32)
    for j in range(lo, hi, BLOCK_N):
        t = j + tl.arange(0, BLOCK_N)
        t_mask = t < hi
        slot = tl.load(kv_indices_ptr + start + t, mask=t_mask, other=0)
        offs = (slot[None, :, None] * stride_slot + hk[:, None, None] * stride_head
                + d[None, None, :])  # [H_KV, BLOCK_N, D]
        k = tl.load(k_ptr + offs, mask=t_mask[None, :, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, :, None, :] * k[:, None, :, :], axis=3) * scale_log2  # [H_KV, G_PAD, N]
        s = tl.where(t_mask[None, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=2))
        p = tl.exp2(s - m_new[:, :, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=2)
        v = tl.load(v_ptr + offs, mask=t_mask[None, :, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, :, None] + tl.sum(p[:, :, :, None] * v[:, None, :, :], axis=2)
        m_i = m_new
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, :, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + row * stride_ob + heads[:, :, None] * stride_oh + split * stride_os
             + d[None, None, :], out, mask=g_mask[:, :, None])
    tl.store(lse_ptr + row * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


def all_heads_attention(q, k_pool, v_pool, kv_indptr, kv_indices, scale, num_splits,
                        block_n=8, num_warps=4, num_stages=2):
    b, hq, d = q.shape
    h_kv = k_pool.shape[1]
    out = torch.empty_like(q)
    partial, lse = split_buffers(q, num_splits)
    _all_heads_kernel[(b, num_splits)](
        q, k_pool, v_pool, kv_indptr, kv_indices, partial, lse,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), partial.stride(0),
        partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        scale * 1.4426950408889634, num_splits,
        H_KV=h_kv, G=hq // h_kv, G_PAD=triton.next_power_of_2(hq // h_kv), D=d,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    merge_splits(partial, lse, out, num_splits)
    return out


def check_cpu() -> None:
    for h_kv, g in ((2, 2), (4, 1), (2, 3)):
        lens = [5, 40, 17, 0, 33]
        total = sum(lens)
        k = torch.randn(total + 1, h_kv, 32)
        v = torch.randn_like(k)
        indptr = torch.tensor([0, *itertools.accumulate(lens)])
        idx = torch.randperm(total) + 1
        q = torch.randn(len(lens), h_kv * g, 32)
        for s in (1, 3):
            ref = decode_attention(q, k, v, indptr, idx, 0.2, s, block_n=16)
            got = all_heads_attention(q, k, v, indptr, idx, 0.2, s, block_n=8)
            print(f"cpu kv heads {h_kv} group {g} splits {s} max err {(got - ref).abs().max().item():.2g}")


def bench() -> None:
    from triton.testing import do_bench_cudagraph
    dev = torch.device("cuda")
    rng = random.Random(0)
    cases = [
        ("b256 100-2048", [rng.randint(100, 2048) for _ in range(256)]),
        ("b120 400-2048", [rng.randint(400, 2048) for _ in range(120)]),
        ("b53 800-2048", [rng.randint(800, 2048) for _ in range(53)]),
        ("b21 1100-2048", [rng.randint(1100, 2048) for _ in range(21)]),
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
        nbytes = 2 * 2 * total * 8 * 128
        S = choose_num_splits(len(lens), 8, 40960, dev)
        ref = decode_attention(q, k, v, indptr, idx, 0.088, S)
        ms = do_bench_cudagraph(lambda: decode_attention(q, k, v, indptr, idx, 0.088, S), rep=200)
        row = [f"now S{S} {ms*1e3:6.1f}us {nbytes/ms/1e9:4.2f}"]
        base = max(1, triton.cdiv(264, len(lens)))
        for s_mult, bn, nw, ns in ((1, 4, 4, 2), (1, 8, 4, 2), (1, 8, 8, 2), (2, 8, 4, 2),
                                    (1, 8, 4, 3), (1, 16, 8, 2)):
            s = min(64, base * s_mult)
            try:
                got = all_heads_attention(q, k, v, indptr, idx, 0.088, s, bn, nw, ns)
                err = (got.float() - ref.float()).abs().max().item()
                ms = do_bench_cudagraph(lambda: all_heads_attention(q, k, v, indptr, idx, 0.088, s, bn, nw, ns), rep=200)
                row.append(f"S{s} bn{bn} w{nw} s{ns} {ms*1e3:6.1f}us {nbytes/ms/1e9:4.2f}" + (f" ERR {err:.2g}" if err > 0.02 else ""))
            except Exception as exc:
                row.append(f"S{s} bn{bn} w{nw} s{ns} failed {type(exc).__name__}: {str(exc)[:80]}")
        print(f"{name:14s} | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    check_cpu() if sys.argv[1:] == ["cpu"] else bench()
