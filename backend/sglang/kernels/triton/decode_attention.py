"""Decode attention over the paged KV pool: one query token per request, split-K.

Program (request b, KV head h, split s) attends the query heads that share KV head h (padded
to a tensor-core tile) over the s-th slice of request b's slots and writes a partial output
and its log-sum-exp; a second kernel merges the slices. Sequence lengths are read on the
device from `kv_indptr`, so the grid depends only on the batch size and the split count and
any split count is correct (a slice past the end of a short request is simply empty).

Programs start in the order of a `row_order` when given: longest context first
(`longest_first`), so the longest requests do not start last and leave most multiprocessors
idle while they finish (H200, requests of 300-1,800 tokens: 4-13% faster at 32-192 rows).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.triton.common import (
    LOG2E,
    MIN_DOT_TILE,
    attend_slots,
    dot_precision,
    request_of,
    upcast_dots,
)

# arguments that change with the batch (slice counts, and the log-sum-exp strides that
# follow them): not specialised on, so a new slice count reuses the compiled split kernel
# rather than compiling another in the middle of traffic; the merge kernel walks the slices
# a chunk at a time, so it compiles once per chunk size (two), whatever the slice count
SPLIT_ARGS = ("num_splits", "stride_lb", "stride_lh")
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 32
# slices per step of the merge kernel's loop: small chunks for the few slices of large
# batches (a 64-slice block cost 18 against 13.7 us at 256 rows and 4 slices, H100), one
# chunk for a small batch's many slices (a two-pass loop of 8-slice steps cost 3.8 against
# 2.3 us at 4 rows and 32 slices)
MERGE_CHUNKS = (8, 32)
PROGRAMS_PER_SM = 8
# 128-key blocks in two stages (`long blocks`; 40 KiB of shared memory a program for sm_90):
# measured on an H100 over the offline workload's lengths, rows alone that give every
# multiprocessor one and a half programs or more want no slices (32-128 rows 4-11% faster
# with one slice than with 2-5: no merge, no float32 partials), fewer rows about four
# programs per multiprocessor (16 rows: 3-6 slices best)
LONG_BLOCK_PROGRAMS_PER_SM = 4
LONG_BLOCK_WHOLE_ROW_WAVES = 1.5
# batches from this many rows start their programs longest request first (`longest_first`);
# below it the order kernel costs about what it saves
ROW_ORDER_MIN_ROWS = 8
_ORDER_BLOCK = 64


@triton.jit(do_not_specialize=["num_rows"])
def _longest_first_kernel(indptr_ptr, order_ptr, num_rows, BLOCK: tl.constexpr):
    # row i's place is the number of rows that go before it: longer ones, and equally long
    # ones above it (a stable order)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i_mask = i < num_rows
    len_i = tl.load(indptr_ptr + i + 1, mask=i_mask, other=0) - tl.load(
        indptr_ptr + i, mask=i_mask, other=0)
    place = tl.zeros([BLOCK], dtype=tl.int32)
    for first in range(0, num_rows, BLOCK):
        j = first + tl.arange(0, BLOCK)
        j_mask = j < num_rows
        len_j = tl.load(indptr_ptr + j + 1, mask=j_mask, other=0) - tl.load(
            indptr_ptr + j, mask=j_mask, other=0)
        before = (len_j[None, :] > len_i[:, None]) | (
            (len_j[None, :] == len_i[:, None]) & (j[None, :] < i[:, None]))
        place += tl.sum((before & j_mask[None, :]).to(tl.int32), axis=1)
    tl.store(order_ptr + place, i.to(tl.int32), mask=i_mask)


def longest_first(kv_indptr: torch.Tensor) -> torch.Tensor:
    """The rows of a batch ([B + 1] `kv_indptr`) by context length, longest first (ties in
    row order): [B] int32, worked out on the device in one launch."""
    num_rows = kv_indptr.shape[0] - 1
    order = torch.empty(num_rows, dtype=torch.int32, device=kv_indptr.device)
    if num_rows > 0:
        _longest_first_kernel[(triton.cdiv(num_rows, _ORDER_BLOCK),)](
            kv_indptr, order, num_rows, BLOCK=_ORDER_BLOCK)
    return order


@triton.jit(do_not_specialize=SPLIT_ARGS)
def _decode_split_kernel(
    q_ptr, k_pool_ptr, v_pool_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale_log2, group_size, head_dim, num_splits,
    row_group_ptr, group_prefix_ptr, req_ids_ptr, row_order_ptr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr, WRITE_LSE: tl.constexpr,
    HAS_CASCADE: tl.constexpr, HAS_REQ_IDS: tl.constexpr, ROW_ORDER: tl.constexpr,
):
    # a row's KV heads are neighbouring programs: they read the same slots' K/V at about the
    # same time (on an H100, 2-5% faster at batch 256 than rows side by side)
    kv_head = tl.program_id(0)
    request = tl.program_id(1)
    if ROW_ORDER:
        request = tl.load(row_order_ptr + request)
    split = tl.program_id(2)
    kv_request = request_of(request, req_ids_ptr, HAS_REQ_IDS)
    kv_start = tl.load(kv_indptr_ptr + kv_request)
    seq_len = tl.load(kv_indptr_ptr + kv_request + 1) - kv_start
    if HAS_CASCADE:  # a grouped row's shared prefix is the cascade kernel's: skip it
        group = tl.load(row_group_ptr + request)
        skip = tl.load(group_prefix_ptr + tl.maximum(group, 0))
        skip = tl.where(group >= 0, skip, 0)
        kv_start += skip
        seq_len -= skip
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    head_offs = tl.arange(0, BLOCK_H)
    heads = kv_head * group_size + head_offs
    head_mask = head_offs < group_size
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_ptrs = q_ptr + request * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=head_mask[:, None] & d_mask[None, :], other=0.0)

    out, lse = attend_slots(
        q, k_pool_ptr, v_pool_ptr, kv_indices_ptr + kv_start, lo, hi, kv_head,
        stride_k_slot, stride_k_head, stride_v_slot, stride_v_head, scale_log2, d, d_mask,
        BLOCK_H, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOTS,
    )
    o_ptrs = out_ptr + request * stride_ob + heads[:, None] * stride_oh + split * stride_os
    o_mask = head_mask[:, None] & d_mask[None, :]
    tl.store(o_ptrs + d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    if WRITE_LSE:
        tl.store(lse_ptr + request * stride_lb + heads * stride_lh + split, lse, mask=head_mask)


@triton.jit(do_not_specialize=SPLIT_ARGS + ("num_prefix_splits",))
def _merge_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ot, stride_oh,
    num_splits, head_dim, row_group_ptr, num_prefix_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CASCADE: tl.constexpr,
):
    request = tl.program_id(0)
    head = tl.program_id(1)
    num_used = num_splits
    if HAS_CASCADE:  # a grouped row's prefix slices follow its own
        group = tl.load(row_group_ptr + request)
        num_used = tl.where(group >= 0, num_splits + num_prefix_splits, num_splits)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    lse_row = lse_ptr + request * stride_lb + head * stride_lh
    p_row = partial_ptr + request * stride_pb + head * stride_ph
    # one pass, online: the running sums are rescaled whenever a chunk raises the maximum
    top = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, num_used, BLOCK_S):
        s_mask = first + s < num_used
        lse = tl.load(lse_row + first + s, mask=s_mask, other=float("-inf"))
        p_ptrs = p_row + (first + s)[:, None] * stride_ps + d[None, :]
        partial = tl.load(p_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        new_top = tl.maximum(top, tl.max(lse, axis=0))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # no keys yet: weights 0
        rescale = tl.exp2(top - base)
        weights = tl.exp2(lse - base)
        total = total * rescale + tl.sum(weights, axis=0)
        acc = acc * rescale + tl.sum(partial * weights[:, None], axis=0)
        top = new_top
    out = acc / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + request * stride_ot + head * stride_oh + d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=8)
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_num_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> int:
    """Enough slices to give every multiprocessor about `programs_per_sm` programs (each
    streams its slice's keys one block at a time, so bandwidth needs several in flight per
    multiprocessor), none of them tiny."""
    programs = batch_size * num_kv_heads
    wanted = triton.cdiv(programs_per_sm * multiprocessor_count(device), max(programs, 1))
    by_length = triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def choose_long_block_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """`choose_num_splits` for long blocks: one slice once the rows fill the
    multiprocessors LONG_BLOCK_WHOLE_ROW_WAVES times over, else about
    LONG_BLOCK_PROGRAMS_PER_SM programs per multiprocessor."""
    if batch_size * num_kv_heads >= LONG_BLOCK_WHOLE_ROW_WAVES * multiprocessor_count(device):
        return 1
    return choose_num_splits(batch_size, num_kv_heads, max_seq_len, device,
                             LONG_BLOCK_PROGRAMS_PER_SM)


def decode_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    num_splits: int,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    req_ids: torch.Tensor | None = None,
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, D] (request b's one token is row b) over its slots; [B, Hq, D].

    With `req_ids` ([B] int64), row r attends the slots of request req_ids[r] of `kv_indptr`.
    With `row_order` ([B] int32, a permutation of the rows), programs start in that order.
    `num_warps`/`num_stages` override Triton's launch defaults (None keeps them)."""
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    # one slice is the output itself; several are merged
    partial, lse = (out, None) if num_splits == 1 else split_buffers(q, num_splits)
    decode_slices(q, k_pool_layer, v_pool_layer, kv_indptr, kv_indices, scale, num_splits,
                  partial, lse, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                  req_ids=req_ids, row_order=row_order)
    if lse is not None:
        merge_splits(partial, lse, out, num_splits)
    return out


def decode_slices(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    cascade: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    req_ids: torch.Tensor | None = None,
    row_order: torch.Tensor | None = None,
) -> None:
    """Launch the split kernel: with `lse`, slice s of each request goes to
    out[b, :, s] ([B, Hq, slices, D] float32) and its log-sum-exp to lse[b, :, s]; without,
    the one slice is the output ([B, Hq, D]). With a `cascade` plan, grouped rows start after
    their group's shared prefix. With `req_ids`, row r of q is request req_ids[r]. With
    `row_order`, the programs of row row_order[i] start i-th."""
    batch_size, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pool_layer.shape[1]
    group_size = num_q_heads // num_kv_heads
    launch = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
    strides = (
        q.stride(0), q.stride(1), k_pool_layer.stride(0), k_pool_layer.stride(1),
        v_pool_layer.stride(0), v_pool_layer.stride(1),
    )
    if lse is None:
        out_strides = (out.stride(0), out.stride(1), 0, 0, 0)
    else:
        out_strides = (out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1))
    _decode_split_kernel[(num_kv_heads, batch_size, num_splits)](
        q, k_pool_layer, v_pool_layer, kv_indptr, kv_indices, out,
        lse if lse is not None else out,
        *strides, *out_strides,
        scale * LOG2E, group_size, head_dim, num_splits,
        cascade[0] if cascade is not None else out, cascade[3] if cascade is not None else out,
        req_ids if req_ids is not None else out,
        row_order if row_order is not None else out,
        BLOCK_H=max(MIN_DOT_TILE, triton.next_power_of_2(group_size)), BLOCK_N=block_n,
        BLOCK_D=max(MIN_DOT_TILE, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOTS=upcast_dots(),
        WRITE_LSE=lse is not None, HAS_CASCADE=cascade is not None,
        HAS_REQ_IDS=req_ids is not None, ROW_ORDER=row_order is not None, **launch,
    )


def split_buffers(q: torch.Tensor, num_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 partial outputs [B, Hq, slices, D] and their log-sum-exps [B, Hq, slices]."""
    batch_size, num_q_heads, head_dim = q.shape
    partial = torch.empty((batch_size, num_q_heads, num_slices, head_dim), dtype=torch.float32,
                          device=q.device)
    lse = torch.empty((batch_size, num_q_heads, num_slices), dtype=torch.float32,
                      device=q.device)
    return partial, lse


def merge_splits(
    partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, num_splits: int,
    row_group: torch.Tensor | None = None, num_prefix_splits: int = 0,
) -> None:
    """out[b, h] = the softmax-weighted merge of request b's first `num_splits` slices, and
    of the `num_prefix_splits` after them where `row_group[b] >= 0` (cascade)."""
    batch_size, num_q_heads, num_slices, head_dim = partial.shape
    chunk = MERGE_CHUNKS[0] if num_slices <= MERGE_CHUNKS[0] else MERGE_CHUNKS[1]
    _merge_splits_kernel[(batch_size, num_q_heads)](
        partial, lse, out,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits, head_dim, row_group if row_group is not None else lse, num_prefix_splits,
        BLOCK_S=chunk,
        BLOCK_D=max(MIN_DOT_TILE, triton.next_power_of_2(head_dim)),
        HAS_CASCADE=row_group is not None,
    )
