"""Padding a live decode batch into a CUDA graph's static input buffers, in one launch.

Program i fills row i of a bucket of `grid` rows. Rows below `num_live` copy the live
request's token id, position, output slot and KV slots; the rest become padding rows: token
0 at position 0 writing to the padding slot 0, attending one key (slot 0). Every length is
read on the device from the live `kv_indptr`, so nothing here waits on the host. A cascade
plan ([4, N] static, backend/cascade.py) is copied the same way; padding rows and a batch
without a plan get no group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY_BLOCK = 1024


@triton.jit(do_not_specialize=["num_live", "stride_src_cascade"])  # both follow the live batch
def _pad_decode_inputs_kernel(
    src_ids_ptr, src_positions_ptr, src_slots_ptr, src_indptr_ptr, src_indices_ptr,
    ids_ptr, positions_ptr, slots_ptr, indptr_ptr, indices_ptr,
    num_live, src_cascade_ptr, cascade_ptr, stride_src_cascade, stride_cascade,
    BLOCK: tl.constexpr, HAS_CASCADE: tl.constexpr, SRC_CASCADE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = row < num_live
    total = tl.load(src_indptr_ptr + num_live)
    token = tl.load(src_ids_ptr + row, mask=live, other=0)
    position = tl.load(src_positions_ptr + row, mask=live, other=0)
    slot = tl.load(src_slots_ptr + row, mask=live, other=0)
    start = tl.load(src_indptr_ptr + row, mask=live, other=0)
    end = tl.load(src_indptr_ptr + row + 1, mask=live, other=0)
    tl.store(ids_ptr + row, token)
    tl.store(positions_ptr + row, position)
    tl.store(slots_ptr + row, slot)
    pad_start = total + row - num_live
    tl.store(indptr_ptr + row + 1, tl.where(live, end, pad_start + 1))
    tl.store(indptr_ptr + row, 0, mask=row == 0)
    tl.store(indices_ptr + pad_start, 0, mask=row >= num_live)
    if HAS_CASCADE:
        plan = tl.arange(0, 4)  # row_group, group_first, group_rows, group_prefix
        if SRC_CASCADE:
            values = tl.load(src_cascade_ptr + plan * stride_src_cascade + row,
                             mask=(plan * 0 + row) < num_live, other=0)
            values = tl.where((plan == 0) & (row >= num_live), -1, values)
        else:
            values = tl.where(plan == 0, -1, tl.zeros([4], dtype=tl.int64))
        tl.store(cascade_ptr + plan * stride_cascade + row, values)
    for offset in range(start, end, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        mask = offs < end
        tl.store(indices_ptr + offs, tl.load(src_indices_ptr + offs, mask=mask), mask=mask)


def pad_decode_inputs(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    out_slots: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    static: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cascade: torch.Tensor | None = None,
    static_cascade: torch.Tensor | None = None,
) -> None:
    """Write a live decode batch of B requests (one token each; int64 tensors as in
    ForwardBatch) into static buffers `(input_ids [N], positions [N], out_slots [N],
    kv_indptr [N + 1], kv_indices [>= len(kv_indices) + N - B])` of a bucket N >= B,
    padding rows B..N-1 as the module docstring says; with `static_cascade` ([4, N]), the
    batch's cascade plan too (none when `cascade` is None)."""
    static_ids, static_positions, static_slots, static_indptr, static_indices = static
    bucket = static_ids.shape[0]
    num_live = input_ids.shape[0]
    if num_live > bucket or static_indptr.shape[0] != bucket + 1:
        raise ValueError(f"a batch of {num_live} does not fit a bucket of {bucket}")
    if kv_indices.shape[0] + bucket - num_live > static_indices.shape[0]:
        raise ValueError("the static kv_indices buffer is too small for this batch")
    _pad_decode_inputs_kernel[(bucket,)](
        input_ids, positions, out_slots, kv_indptr, kv_indices,
        static_ids, static_positions, static_slots, static_indptr, static_indices,
        num_live,
        cascade if cascade is not None else static_ids,
        static_cascade if static_cascade is not None else static_ids,
        cascade.stride(0) if cascade is not None else 0,
        static_cascade.stride(0) if static_cascade is not None else 0,
        BLOCK=_COPY_BLOCK, HAS_CASCADE=static_cascade is not None,
        SRC_CASCADE=cascade is not None,
    )
