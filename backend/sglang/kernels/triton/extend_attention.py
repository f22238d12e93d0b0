"""Extend (prefill) attention of new tokens over their requests' paged KV, online softmax.

Program (request b, KV head h, query block m) takes the rows of every query head that shares
KV head h for the new tokens `m * BLOCK_M ...` of request b (BLOCK_M tokens x GROUP heads,
GROUP the group size rounded up to a power of two), so each K/V tile it loads serves the
whole group, and the tile's rows fill a tensor-core block. It reads every KV slot those
tokens may see through `kv_indices` in two passes: first the keys every row sees (the cached
prefix and the new tokens before the block), without masks, then the block's diagonal
(causal within the new tokens). The K/V of the new tokens must already be in the pool. A
request adding one token (decode) is one short block, so mixed batches can run here whole;
`skip_single` leaves those requests to the decode kernel (triton_ops.paged_attention does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.triton.common import (
    LOG2E,
    MIN_DOT_TILE,
    attend_keys,
    dot_precision,
    upcast_dots,
)

# Query rows per program (tokens x group heads), measured on an H100 (bf16, 16 query heads on
# 8 KV heads, docs/BENCHMARKS.md eighth run): 64 where the new tokens' causal attention
# dominates (prefill of prompts without a cached prefix: more, shorter programs, less work
# past the diagonal), 256 where attention to cached prefixes does, which every block reads
# again (128-token questions over 2,048 cached tokens: 1.45x the 128-row tiles of before) and
# the runs of new tokens are longer than a 64-row tile.
TILE_ROWS = 64
TILE_ROWS_OVER_PREFIX = 256
MAX_TILE_ELEMENTS = 256 * 128  # rows x head_dim: the float32 accumulator stays in registers
FLOAT32_TILE_ROWS = 64  # float32 queries (the exact path): the tile size measured before


@triton.jit
def _extend_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, qo_indptr_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr,
    stride_qt, stride_qh, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_ot, stride_oh,
    scale_log2, group_size, head_dim,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    block_m = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + request)
    extend_len = tl.load(qo_indptr_ptr + request + 1) - q_start
    first_row = 2 if SKIP_SINGLE else 1  # requests adding one token left to the decode kernel
    if (block_m * BLOCK_M < extend_len) & (extend_len >= first_row):
        kv_start = tl.load(kv_indptr_ptr + request)
        seq_len = tl.load(kv_indptr_ptr + request + 1) - kv_start
        prefix_len = seq_len - extend_len

        # row r: token block_m * BLOCK_M + r // GROUP of the request, query head r % GROUP
        # of the KV head's group
        r = tl.arange(0, BLOCK_M * GROUP)
        tokens = block_m * BLOCK_M + r // GROUP
        heads = kv_head * group_size + r % GROUP
        row_mask = (tokens < extend_len) & (r % GROUP < group_size)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        q_ptrs = q_ptr + (q_start + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh
        q = tl.load(q_ptrs + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        last_visible = prefix_len + tokens  # token i sees kv positions 0..prefix_len + i

        m_i = tl.full([BLOCK_M * GROUP], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M * GROUP], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP, BLOCK_D], dtype=tl.float32)
        slots = kv_indices_ptr + kv_start
        # whole key blocks that every row sees: up to the block's first token, inclusive
        seen_by_all = (prefix_len + block_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        m_i, l_i, acc = attend_keys(
            q, m_i, l_i, acc, k_pool_ptr, v_pool_ptr, slots, 0, seen_by_all, kv_head,
            last_visible, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
            scale_log2, d, d_mask, BLOCK_N, False, False, DOT_PRECISION, UPCAST_DOTS,
        )
        hi = tl.minimum(seq_len, prefix_len + (block_m + 1) * BLOCK_M)
        m_i, l_i, acc = attend_keys(
            q, m_i, l_i, acc, k_pool_ptr, v_pool_ptr, slots, seen_by_all, hi, kv_head,
            last_visible, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
            scale_log2, d, d_mask, BLOCK_N, True, True, DOT_PRECISION, UPCAST_DOTS,
        )

        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + (q_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh
        tl.store(o_ptrs + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


def tile_tokens(group: int, block_d: int, element_size: int, max_extend_len: int,
                prefix_heavy: bool) -> int:
    """New tokens per program for query heads in groups of `group` (a power of two): the
    tile's rows over the group. TILE_ROWS_OVER_PREFIX rows where attention to cached prefixes
    outweighs the causal part and some run of new tokens is longer than a TILE_ROWS tile,
    else TILE_ROWS; at most MAX_TILE_ELEMENTS / block_d rows, FLOAT32_TILE_ROWS in float32."""
    rows = TILE_ROWS
    if prefix_heavy and max_extend_len > TILE_ROWS // group:
        rows = TILE_ROWS_OVER_PREFIX
    rows = min(rows, MAX_TILE_ELEMENTS // block_d)
    if element_size > 2:  # twice the shared memory per tile: keep the proven size
        rows = min(rows, FLOAT32_TILE_ROWS)
    return max(1, rows // group)


def extend_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    max_extend_len: int,
    prefix_heavy: bool = False,
    block_m: int | None = None,
    block_n: int = 64,
    skip_single: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] (request b owns rows qo_indptr[b]:qo_indptr[b+1]),
    into `out` (any [T, Hq, D] tensor with unit last stride) when given.
    With `skip_single`, the rows of requests adding one token are left unwritten.
    `block_m` is the new tokens per program (default: `tile_tokens`, from `prefix_heavy`:
    whether attention to cached prefixes outweighs the causal part, `ForwardBatch.
    extend_shape`); `num_warps`/`num_stages` override the launch defaults."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool_layer.shape[1]
    if out is None:
        out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} with "
                         "unit last stride")
    batch_size = qo_indptr.shape[0] - 1
    if num_tokens == 0 or batch_size == 0:
        return out
    group_size = num_q_heads // num_kv_heads
    group = triton.next_power_of_2(group_size)
    block_d = max(MIN_DOT_TILE, triton.next_power_of_2(head_dim))
    if block_m is None:
        block_m = tile_tokens(group, block_d, q.element_size(), max_extend_len, prefix_heavy)
    block_m = max(block_m, triton.cdiv(MIN_DOT_TILE, group))  # tl.dot needs >= 16 rows
    launch = {"num_warps": num_warps or (8 if block_m * group * block_d >= 128 * 128 else 4)}
    if num_stages:
        launch["num_stages"] = num_stages
    grid = (batch_size, num_kv_heads, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_pool_layer, v_pool_layer, qo_indptr, kv_indptr, kv_indices, out,
        q.stride(0), q.stride(1), k_pool_layer.stride(0), k_pool_layer.stride(1),
        v_pool_layer.stride(0), v_pool_layer.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, group_size, head_dim,
        BLOCK_M=block_m, GROUP=group, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOTS=upcast_dots(),
        SKIP_SINGLE=skip_single, **launch,
    )
    return out
