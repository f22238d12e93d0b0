"""Cascade decode attention: a prefix shared by a group of requests is read once per group.

The plan (backend/cascade.py) names groups of consecutive one-token rows (a decode batch's,
or a mixed batch's `single_rows` through `req_ids`) that probably share their first slots.
Per step, `measure_shared_prefixes` lowers each group's bound to the longest common prefix of
its members' slot lists (one program per row, atomic min), so the kernels below are exact
whatever the host proposed. Per layer:

- the split kernel (decode_attention.py) attends each row's own suffix, past its group's
  prefix, in `num_splits` slices;
- the prefix kernel, program (group g, KV head h, slice p), stacks the queries of all of g's
  rows for h's query heads into one tile and attends them over the p-th slice of the shared
  prefix: its keys and values are read once for the group's rows (at most
  `cascade_rows_per_group`, so that the tile stays within CASCADE_TILE_ROWS query rows);
- the merge kernel combines every row's slices (prefix slices only for grouped rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.cascade import cascade_rows_per_group
from backend.sglang.kernels.triton.common import (
    LOG2E,
    MIN_DOT_TILE,
    attend_slots,
    dot_precision,
    request_of,
    upcast_dots,
)
from backend.sglang.kernels.triton.decode_attention import (
    decode_slices,
    merge_splits,
    multiprocessor_count,
    split_buffers,
)

_LCP_BLOCK = 512
_MAX_PREFIX_SPLITS = 16


@triton.jit
def _shared_prefix_kernel(
    kv_indptr_ptr, kv_indices_ptr, row_group_ptr, group_first_ptr, group_prefix_ptr,
    req_ids_ptr, BLOCK: tl.constexpr, HAS_REQ_IDS: tl.constexpr,
):
    row = tl.program_id(0)
    group = tl.load(row_group_ptr + row)
    slot_group = tl.maximum(group, 0)
    first = tl.load(group_first_ptr + slot_group)
    active = (group >= 0) & (first != row)
    own_request = request_of(row, req_ids_ptr, HAS_REQ_IDS)
    lead_request = request_of(first, req_ids_ptr, HAS_REQ_IDS)
    own = tl.load(kv_indptr_ptr + own_request)
    lead = tl.load(kv_indptr_ptr + lead_request)
    own_len = tl.load(kv_indptr_ptr + own_request + 1) - own
    lead_len = tl.load(kv_indptr_ptr + lead_request + 1) - lead
    # never a row's newest token: every row keeps a suffix of its own
    bound = tl.minimum(tl.load(group_prefix_ptr + slot_group),
                       tl.minimum(own_len, lead_len) - 1)
    bound = tl.where(active, bound, 0)
    common = bound
    for start in range(0, bound, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < bound
        mine = tl.load(kv_indices_ptr + own + offs, mask=mask, other=0)
        theirs = tl.load(kv_indices_ptr + lead + offs, mask=mask, other=0)
        differs = mask & (mine != theirs)
        common = tl.minimum(common, tl.min(tl.where(differs, offs, bound), axis=0))
    tl.atomic_min(group_prefix_ptr + slot_group, common.to(tl.int64), mask=active)


@triton.jit(do_not_specialize=("stride_lb", "stride_lh", "first_split", "num_prefix_splits"))
def _cascade_prefix_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, kv_indptr_ptr, kv_indices_ptr,
    group_first_ptr, group_rows_ptr, group_prefix_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale_log2, group_size, head_dim, first_split, num_prefix_splits, req_ids_ptr,
    GROUP_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    HAS_REQ_IDS: tl.constexpr,
):
    group = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_rows = tl.load(group_rows_ptr + group)
    first = tl.load(group_first_ptr + group)
    prefix_len = tl.where(num_rows > 0, tl.load(group_prefix_ptr + group), 0)
    split_len = tl.cdiv(tl.cdiv(prefix_len, num_prefix_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, prefix_len)
    kv_start = tl.load(kv_indptr_ptr + request_of(first, req_ids_ptr, HAS_REQ_IDS))

    m = tl.arange(0, BLOCK_M)
    member = m // GROUP_P2
    head = kv_head * group_size + m % GROUP_P2
    row_mask = (member < num_rows) & (m % GROUP_P2 < group_size)
    rows = first + member
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    out, lse = attend_slots(
        q, k_pool_ptr, v_pool_ptr, kv_indices_ptr + kv_start, lo, hi, kv_head,
        stride_k_slot, stride_k_head, stride_v_slot, stride_v_head, scale_log2, d, d_mask,
        BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOTS,
    )
    slice_index = first_split + split
    o_ptrs = (out_ptr + rows[:, None] * stride_ob + head[:, None] * stride_oh
              + slice_index * stride_os + d[None, :])
    tl.store(o_ptrs, out, mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + rows * stride_lb + head * stride_lh + slice_index, lse, mask=row_mask)


def choose_prefix_splits(
    batch_size: int, num_q_heads: int, num_kv_heads: int, device: torch.device
) -> int:
    """Slices of each shared prefix: about one program per multiprocessor when the batch is
    in groups of the most rows (each program's tile holds a whole group's queries; on an
    H100 more, smaller slices measured slower)."""
    rows = max(1, cascade_rows_per_group(num_q_heads, num_kv_heads))
    groups = triton.cdiv(batch_size, rows) * num_kv_heads
    wanted = triton.cdiv(multiprocessor_count(device), groups)
    return max(1, min(wanted, _MAX_PREFIX_SPLITS))


def measure_shared_prefixes(
    kv_indptr: torch.Tensor, kv_indices: torch.Tensor, cascade: torch.Tensor,
    req_ids: torch.Tensor | None = None,
) -> None:
    """Lower each group's prefix bound (cascade[3]) to the longest common prefix of its
    members' slot lists, in place. Run once per step, before the first layer. With
    `req_ids`, plan row r is request req_ids[r] of `kv_indptr`."""
    _shared_prefix_kernel[(cascade.shape[1],)](
        kv_indptr, kv_indices, cascade[0], cascade[1], cascade[3],
        req_ids if req_ids is not None else cascade[0],
        BLOCK=_LCP_BLOCK, HAS_REQ_IDS=req_ids is not None,
    )


def cascade_decode_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    cascade: torch.Tensor,
    scale: float,
    num_splits: int,
    num_prefix_splits: int,
    block_n: int = 64,
    prefix_block_n: int = 64,
    req_ids: torch.Tensor | None = None,
    suffix_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over the batch's slots with the groups of the
    `cascade` plan ([4, B], prefixes measured) reading their shared prefix once; [B, Hq, D].
    `block_n` and `prefix_block_n` are the keys per step of the suffix and prefix kernels,
    `suffix_stages` the suffix kernel's pipeline depth (None: Triton's default).
    With `req_ids`, row r of q (and of the plan) is request req_ids[r] of `kv_indptr`."""
    batch_size, num_q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if batch_size == 0:
        return out
    num_kv_heads = k_pool_layer.shape[1]
    group_size = num_q_heads // num_kv_heads
    partial, lse = split_buffers(q, num_splits + num_prefix_splits)
    decode_slices(q, k_pool_layer, v_pool_layer, kv_indptr, kv_indices, scale, num_splits,
                  partial, lse, cascade, block_n=block_n, num_stages=suffix_stages,
                  req_ids=req_ids)
    group_p2 = triton.next_power_of_2(group_size)
    _cascade_prefix_kernel[(max(1, batch_size // 2), num_kv_heads, num_prefix_splits)](
        q, k_pool_layer, v_pool_layer, kv_indptr, kv_indices,
        cascade[1], cascade[2], cascade[3], partial, lse,
        q.stride(0), q.stride(1), k_pool_layer.stride(0), k_pool_layer.stride(1),
        v_pool_layer.stride(0), v_pool_layer.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        scale * LOG2E, group_size, head_dim, num_splits, num_prefix_splits,
        req_ids if req_ids is not None else cascade[0],
        GROUP_P2=group_p2,
        BLOCK_M=max(MIN_DOT_TILE, cascade_rows_per_group(num_q_heads, num_kv_heads) * group_p2),
        BLOCK_N=prefix_block_n, BLOCK_D=max(MIN_DOT_TILE, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOTS=upcast_dots(),
        HAS_REQ_IDS=req_ids is not None, num_stages=2,
    )
    merge_splits(partial, lse, out, num_splits, cascade[0], num_prefix_splits)
    return out
