"""Pieces shared by the attention kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_DOT_TILE = 16  # tl.dot needs every tile dimension >= 16


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 dots (no TF32) so the float32 path matches torch tightly."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots() -> bool:
    """Whether dots must take float32 operands: the CPU interpreter multiplies bfloat16 tiles
    as their raw 16-bit integers."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`a @ b` accumulated in float32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)
