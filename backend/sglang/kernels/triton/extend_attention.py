"""Extend (prefill) attention of new tokens over their requests' paged KV, online softmax.

Program (request b, query head h, query block m) reads rows `qo_indptr[b] + m * BLOCK_M ...`
of q and every KV slot they may see through `kv_indices`: the cached prefix and the new tokens
up to the block's last row (causal within the new tokens). The K/V of the new tokens must
already be in the pool. A request adding one token (decode) is one short block, so mixed
batches can run here whole; `skip_single` leaves those requests to the decode kernel, which
reads each KV head once for all its query heads (triton_ops.paged_attention does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.triton.common import (
    LOG2E,
    MIN_DOT_TILE,
    dot_precision,
    mma,
    upcast_dots,
)


@triton.jit
def _extend_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr,
    stride_qt, stride_qh, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_ot, stride_oh,
    scale_log2, group_size, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, SKIP_SINGLE: tl.constexpr,
):
    request = tl.program_id(0)
    head = tl.program_id(1)
    block_m = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + request)
    extend_len = tl.load(qo_indptr_ptr + request + 1) - q_start
    first_row = 2 if SKIP_SINGLE else 1  # requests adding one token left to the decode kernel
    if (block_m * BLOCK_M < extend_len) & (extend_len >= first_row):
        kv_start = tl.load(kv_indptr_ptr + request)
        seq_len = tl.load(kv_indptr_ptr + request + 1) - kv_start
        prefix_len = seq_len - extend_len
        kv_head = head // group_size

        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < extend_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        q_ptrs = q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        last_visible = prefix_len + rows  # row i sees kv positions 0..prefix_len + i

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = tl.minimum(seq_len, prefix_len + (block_m + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < hi
            slots = tl.load(kv_indices_ptr + kv_start + n, mask=n_mask, other=0)
            k_ptrs = (k_pool_ptr + slots[None, :] * stride_k_slot + kv_head * stride_k_head
                      + d[:, None])
            k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)
            scores = mma(q, k, DOT_PRECISION, UPCAST_DOTS) * scale_log2
            visible = n_mask[None, :] & (n[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_ptrs = (v_pool_ptr + slots[:, None] * stride_v_slot + kv_head * stride_v_head
                      + d[None, :])
            v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOTS)
            m_i = m_new

        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


def extend_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    max_extend_len: int,
    block_m: int = 64,
    block_n: int = 64,
    skip_single: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] (request b owns rows qo_indptr[b]:qo_indptr[b+1]).
    With `skip_single`, the rows of requests adding one token are left unwritten.
    `num_warps`/`num_stages` override Triton's launch defaults (None keeps them)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool_layer.shape[1]
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    batch_size = qo_indptr.shape[0] - 1
    if num_tokens == 0 or batch_size == 0:
        return out
    grid = (batch_size, num_q_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_pool_layer, v_pool_layer, qo_indptr, kv_indptr, kv_indices, out,
        q.stride(0), q.stride(1), k_pool_layer.stride(0), k_pool_layer.stride(1),
        v_pool_layer.stride(0), v_pool_layer.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, num_q_heads // num_kv_heads, head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(MIN_DOT_TILE, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOTS=upcast_dots(),
        SKIP_SINGLE=skip_single,
        **{k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v},
    )
    return out
