"""Weight-only quantization of the native runner's linear layers (CPU decode speed).

Decode on a CPU is bound by reading the weights: float32 SmolLM2-135M streams ~540 MB per
step. Quantized once at load time, the same matmuls read a quarter (int8) or an eighth (int4)
of that through torch's packed CPU kernels. The kernels take and return bfloat16 activations
(`KERNEL_DTYPE`; they are slow on float32): `QuantizedWeight.matmul` leaves its result in
bfloat16, so that a model casts once where it needs another dtype, not around every matmul.

- `int8`: symmetric, one scale per output channel (`_weight_int8pack_mm`).
- `int4`: asymmetric groups of `INT4_GROUP_SIZE` inputs with a scale and a zero point each,
  the layout of llama.cpp's Q4_1 (`_weight_int4pack_mm_for_cpu`). A weight whose shape the
  int4 kernel cannot pack (out features not a multiple of 16, in features not a multiple of
  the group) falls back to int8.
- The LM head, under either method: int8 weights and int8 activations (`int8_activations`:
  each row of x quantized with its own scale, then one int8 x int8 -> int32 matmul,
  `torch._int_mm`). Int4 loses too much there (the most sensitive matrix), and the int8 x int8
  product is 2x faster than the bf16-activation kernel at one row, 5x at sixteen, at the same
  greedy agreement with float32. The decoder matmuls keep bf16 activations: quantizing
  theirs costs far more accuracy.

`WEIGHT_QUANT=auto` resolves to `int8` on CPU unless DTYPE is set to float32 explicitly (the
exact path), and to `none` on CUDA and MPS. int8 is the default because it keeps answers
right: int4's bfloat16 group scales and zero points shift whole groups of weights together,
and on SmolLM2-135M that turns "What is the capital of France?" into nonsense, while int8
answers "Paris" like float32. int4 stays available (about 1.4x faster at batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from config import ConfigError

WEIGHT_QUANT_CHOICES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
_INT4_N_MULTIPLE = 16
INT8_PACK_K_MULTIPLE = 16  # torch's int8 CPU kernel reads inputs in blocks of 16 (unchecked)
_INT4_MIDPOINT = 8
_INT4_MAX = 15
_INT8_MAX = 127
_SCALE_DTYPE = torch.bfloat16
KERNEL_DTYPE = torch.bfloat16
_MIN_SCALE = 1e-8


def resolve_weight_quant(weight_quant: str, dtype_flag: str, device: torch.device) -> str:
    """The quantization to apply: `none`, `int8` or `int4`.

    `auto` → `int8` on CPU unless `dtype_flag` (the DTYPE flag as written, before its own
    auto resolution) is `float32`; `none` elsewhere. An explicit method off the CPU is an
    error: the packed kernels are CPU kernels.
    """
    if weight_quant == "auto":
        if device.type == "cpu" and dtype_flag != "float32":
            return "int8"
        return "none"
    if weight_quant not in WEIGHT_QUANT_CHOICES:
        raise ValueError(
            f"unknown weight quantization {weight_quant!r}; "
            f"known: auto, {', '.join(WEIGHT_QUANT_CHOICES)}"
        )
    if weight_quant != "none" and device.type != "cpu":
        raise ConfigError(f"WEIGHT_QUANT={weight_quant} runs on CPU only, not {device.type}")
    return weight_quant


def head_quant_method(method: str) -> str:
    """The LM head's method under `method`: int8 (with int8 activations, see
    `quantize_head_weight`) for the weight-only methods."""
    return "int8" if method == "int4" else method


def int4_fits(out_features: int, in_features: int, group_size: int = INT4_GROUP_SIZE) -> bool:
    """Whether the int4 CPU kernel can pack a weight of this shape."""
    return out_features % _INT4_N_MULTIPLE == 0 and in_features % group_size == 0


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed `[out_features, in_features]` weight and its scales, ready for one kernel."""

    method: str  # "int8" | "int4"
    packed: torch.Tensor
    scales: torch.Tensor  # int8: [N]; int4: [K / group, N, 2] (scale, zero)
    out_features: int
    in_features: int
    group_size: int = 0  # int4 only
    int8_activations: bool = False  # int8 only: quantize x per row too, multiply in int8


    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x W^T` for x [T, in_features] of any float dtype; the result is `KERNEL_DTYPE`
        (float32 with int8 activations)."""
        if self.int8_activations:
            return _int8_activation_matmul(x, self.packed, self.scales)
        x = x.to(KERNEL_DTYPE).contiguous()
        if self.method == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group_size, self.scales
            )
        if self.in_features % INT8_PACK_K_MULTIPLE:  # the packed kernel would read past rows
            return (x @ self.packed.to(KERNEL_DTYPE).t()).mul_(self.scales.to(KERNEL_DTYPE))
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x W^T (+ bias)` for x [T, in_features], in x's dtype."""
        out = self.matmul(x).to(x.dtype)
        return out if bias is None else out.add_(bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the kernel computes with (for checks and references)."""
        if self.method == "int8":
            return self.packed.float() * self.scales.float()[:, None]
        identity = torch.eye(self.in_features, dtype=torch.float32, device=self.packed.device)
        columns = torch.ops.aten._weight_int4pack_mm_for_cpu(
            identity, self.packed, self.group_size, self.scales.float()
        )
        return columns.t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes


def _int8_activation_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """float32 `x W^T` with x quantized to int8 per row (symmetric, its own scale): one
    int8 x int8 -> int32 product (VNNI), then both scales."""
    x = x.float()
    row_scales = x.abs().amax(dim=-1, keepdim=True).clamp_(min=_MIN_SCALE).div_(_INT8_MAX)
    x_int8 = torch.round(x / row_scales).to(torch.int8)
    product = torch._int_mm(x_int8, packed.t())
    return torch.mul(product, scales.float()).mul_(row_scales)


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """Quantize a float `[out_features, in_features]` weight; int4 falls back to int8 for
    shapes its kernel cannot pack."""
    out_features, in_features = weight.shape
    if method == "int4" and int4_fits(out_features, in_features):
        return _quantize_int4(weight.float(), INT4_GROUP_SIZE)
    if method in ("int4", "int8"):
        return _quantize_int8(weight.float())
    raise ValueError(f"cannot quantize a weight with method {method!r}")


def quantize_head_weight(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """Quantize an LM head weight with `method` (an int8 method, see `head_quant_method`),
    multiplying with int8 activations."""
    if method != "int8":
        raise ValueError(f"the LM head is quantized with int8, not {method!r}")
    return replace(_quantize_int8(weight.float()), int8_activations=True)


def _quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    scales = (weight.abs().amax(dim=1) / _INT8_MAX).clamp(min=_MIN_SCALE).to(_SCALE_DTYPE)
    exact_scales = scales.float()[:, None]
    packed = torch.round(weight / exact_scales).clamp(-_INT8_MAX - 1, _INT8_MAX).to(torch.int8)
    return QuantizedWeight("int8", packed, scales, weight.shape[0], weight.shape[1])


def _quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Each group maps `[min, max]` onto `steps + 1` levels from 0, `steps` in 8..15 chosen per
    group for the least squared error (a weight already on a coarser 4-bit grid, as GGUF Q4_1
    weights are, comes back exactly); the kernel computes `(q - 8) * scale + zero`."""
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    span = groups.amax(dim=-1, keepdim=True) - low
    best_error = torch.full_like(low, float("inf"))
    best_scale = torch.zeros_like(low)
    best_zero = torch.zeros_like(low)
    for steps in range(_INT4_MAX, _INT4_MIDPOINT - 1, -1):
        scale = (span / steps).clamp(min=_MIN_SCALE).to(_SCALE_DTYPE).float()
        zero = (low + scale * _INT4_MIDPOINT).to(_SCALE_DTYPE).float()
        levels = _int4_levels(groups, scale, zero)
        error = ((levels - _INT4_MIDPOINT) * scale + zero - groups).square().sum(-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    levels = _int4_levels(groups, best_scale, best_zero).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        levels.view(out_features, in_features), 1
    )
    scales_and_zeros = torch.cat((best_scale, best_zero), dim=-1).transpose(0, 1).contiguous()
    return QuantizedWeight("int4", packed, scales_and_zeros.to(_SCALE_DTYPE), out_features,
                           in_features, group_size)


def _int4_levels(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (torch.round((groups - zero) / scale) + _INT4_MIDPOINT).clamp_(0, _INT4_MAX)
