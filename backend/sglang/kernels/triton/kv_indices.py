"""A step's flat KV index list gathered from the request→slot table, in one launch.

Program b copies `table[rows[b], :kv_indptr[b + 1] - kv_indptr[b]]` into
`kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`, widening the table's int32 slots to int64.
Every length is read on the device, so nothing here waits on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY_BLOCK = 1024


@triton.jit
def _gather_kv_indices_kernel(
    table_ptr, rows_ptr, indptr_ptr, out_ptr,
    table_width,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + program).to(tl.int64)
    start = tl.load(indptr_ptr + program)
    end = tl.load(indptr_ptr + program + 1)
    source = table_ptr + row * table_width
    for offset in range(0, end - start, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        mask = offs < end - start
        slots = tl.load(source + offs, mask=mask, other=0)
        tl.store(out_ptr + start + offs, slots.to(tl.int64), mask=mask)


def gather_kv_indices(
    table: torch.Tensor, rows: torch.Tensor, kv_indptr: torch.Tensor, out: torch.Tensor
) -> None:
    """Fill `out` ([kv_indptr[-1]] int64) with the first `kv_indptr[b + 1] - kv_indptr[b]`
    slots of table row `rows[b]` for each b, back to back (`table` [R, W] contiguous)."""
    batch_size = rows.shape[0]
    if kv_indptr.shape[0] != batch_size + 1:
        raise ValueError("kv_indptr needs one entry more than rows")
    if batch_size == 0:
        return
    _gather_kv_indices_kernel[(batch_size,)](
        table, rows, kv_indptr, out, table.shape[1], BLOCK=_COPY_BLOCK,
    )
