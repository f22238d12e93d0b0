"""Kernel sets: the same free functions with the same signatures, one module per backend.

A runner picks one set at construction (`load_kernel_set`) and its layers call the ops through
it, so CPU/MPS (torch), CUDA (triton) and sgl_kernel/flashinfer implementations are
interchangeable. Sets are imported lazily: a missing optional dependency only matters when
that set is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Protocol, cast

import torch

from backend.batch import ForwardBatch
from backend.sglang.kernels.torch_ops import SplitSum

KERNEL_SETS: dict[str, str] = {
    "torch": "backend.sglang.kernels.torch_ops",
    "triton": "backend.sglang.kernels.triton_ops",
}


class KernelSet(Protocol):
    """The ops the model code calls through a kernel set (see torch_ops for the reference
    semantics). Sets also export the pieces `qkv_prepare` fuses (`apply_rotary`, `store_kv`),
    which the kernel tests check one by one."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def fused_add_rms_norm(
        self, x: torch.Tensor | SplitSum, residual: torch.Tensor, weight: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def build_rope_cache(
        self,
        head_dim: int,
        max_pos: int,
        theta: float,
        rope_scaling: dict[str, Any] | None,
        device: torch.device,
    ) -> torch.Tensor: ...

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def linear_into_norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | SplitSum:
        """`linear` whose result only `fused_add_rms_norm` reads (it may stay split)."""

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def qkv_prepare(
        self,
        qkv: torch.Tensor,
        num_q_heads: int,
        num_kv_heads: int,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None,
        eps: float,
        k_pool_layer: torch.Tensor,
        v_pool_layer: torch.Tensor,
        slots: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], written into `out` (contiguous) when given."""

    CASCADE_ATTENTION: bool  # whether paged_attention uses ForwardBatch.cascade

    def prepare_attention(self, batch: ForwardBatch) -> None:
        """Per-step attention work on the device, once before the first layer."""

    def paged_attention(
        self,
        q: torch.Tensor,
        k_pool_layer: torch.Tensor,
        v_pool_layer: torch.Tensor,
        batch: ForwardBatch,
        scale: float,
        num_kv_heads: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[T, Hq, D], written into `out` (contiguous) when given."""


def default_kernel_set(device: torch.device) -> str:
    """The kernel set to use on `device` when nothing is asked for explicitly: "triton" on
    CUDA when triton is installed, else "torch"."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


def load_kernel_set(name: str) -> KernelSet:
    """Import and return the kernel set registered as `name`."""
    if name not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {name!r}; known: {', '.join(sorted(KERNEL_SETS))}")
    return cast(KernelSet, importlib.import_module(KERNEL_SETS[name]))
