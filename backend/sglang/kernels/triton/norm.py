"""RMSNorm and fused residual-add + RMSNorm: one program per row, float32 math.

Rounding follows torch_ops: the residual sum is rounded to its dtype before it is normalised,
and the normalised row is rounded to the input dtype before the weight multiplies it. The
fused add also takes its x as a `SplitSum` (a split-K linear layer's float32 partials): it
adds them up itself, rounding the sum to the model dtype as the unsplit layer would have.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.torch_ops import SplitSum


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    inner, stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner,
    dim, eps, stride_x_split,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer_idx = row // inner
    inner_idx = row % inner
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x_row = x_ptr + outer_idx * stride_x_outer + inner_idx * stride_x_inner
    if SPLITS:  # float32 partial sums, added up and rounded as the unsplit layer's output
        x = tl.zeros([BLOCK_D], dtype=tl.float32)
        for split in tl.static_range(SPLITS):
            x += tl.load(x_row + split * stride_x_split + offs, mask=mask, other=0.0)
        x = x.to(residual_out_ptr.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_row = residual_ptr + outer_idx * stride_r_outer + inner_idx * stride_r_inner
        r = tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * dim + offs, summed, mask=mask)
        x = summed.to(tl.float32)
        normed_dtype = residual_out_ptr.dtype.element_ty
    else:
        normed_dtype = x_ptr.dtype.element_ty
    mean_square = tl.sum(x * x, axis=0) / dim
    normed = (x * tl.rsqrt(mean_square + eps)).to(normed_dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """`x` as (tensor, inner, stride_outer, stride_inner): row r is x[r // inner, r % inner].

    2-D and 3-D inputs keep their strides (a per-head view of a fused qkv stays a view);
    anything else is flattened to rows.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    rows = x.reshape(-1, x.shape[-1])
    return rows, 1, rows.stride(0), 0


def _launch(
    x: torch.Tensor | SplitSum, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match last dim {dim}")
    splits, stride_split = 0, 0
    if isinstance(x, SplitSum):
        if residual is None or x.partials.dim() != 3 or x.partials.stride(-1) != 1:
            raise ValueError("a split sum is normalised with a residual, from [S, T, D] rows")
        splits, stride_split = x.partials.shape[0], x.partials.stride(0)
        x_rows, inner, stride_xo, stride_xi = x.partials, 1, x.partials.stride(1), 0
    else:
        x_rows, inner, stride_xo, stride_xi = _rows_view(x)
    residual_out: torch.Tensor | None = None
    normed_dtype = x.dtype
    r_rows, stride_ro, stride_ri = x_rows, 0, 0
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError("x and residual must have the same shape")
        normed_dtype = torch.promote_types(x.dtype, residual.dtype)
        residual_out = torch.empty(x.shape, dtype=normed_dtype, device=x.device)
        r_rows, _, stride_ro, stride_ri = _rows_view(residual)
    out_dtype = torch.promote_types(normed_dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    num_rows = out.numel() // dim if dim else 0
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x_rows, r_rows, weight, out, residual_out if residual_out is not None else out,
            inner, stride_xo, stride_xi, stride_ro, stride_ri,
            dim, eps, stride_split,
            HAS_RESIDUAL=residual is not None,
            BLOCK_D=triton.next_power_of_2(dim),
            SPLITS=splits,
        )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim of x (any leading shape, e.g. [T, H, D] per head)."""
    out, _ = _launch(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor | SplitSum, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(rms_norm(x + residual), x + residual)` from one kernel (x's partials added
    up first when it is a `SplitSum`)."""
    out, residual_out = _launch(x, residual, weight, eps)
    assert residual_out is not None
    return out, residual_out
