"""The paged KV pool: one K and one V tensor per layer, indexed by slot (page size 1)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

KV_FP8 = torch.float8_e4m3fn  # KV_CACHE_DTYPE=fp8_e4m3: K/V stored unscaled (±448 saturates)
FP8_MAX = 448.0


def to_pool_dtype(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """x cast for storing in `pool`; into float8, saturated at ±448 first (some torch
    versions turn larger values into NaN rather than the largest finite one)."""
    if pool.dtype == KV_FP8:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(pool.dtype)


class KVPool:
    """K/V storage for `num_slots` tokens; slot 0 is padding and never handed out."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.num_slots = num_slots
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * itemsize

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [T, num_kv_heads, head_dim] into `slots` [T] of `layer`."""
        self.k[layer][slots] = to_pool_dtype(k, self.k[layer])
        self.v[layer][slots] = to_pool_dtype(v, self.v[layer])


def slots_for_free_memory(bytes_per_token: int, fraction: float, device: torch.device) -> int:
    """KV slots that fit in `fraction` of the device memory free now (after the weights)."""
    if device.type != "cuda":
        raise ValueError(f"sizing the KV pool from free memory needs CUDA, not {device.type}")
    free, total = torch.cuda.mem_get_info(device)
    slots = int(free * fraction) // bytes_per_token
    logger.info(
        "KV pool: %d tokens (%.1f GiB of %.1f GiB free, %d bytes per token)",
        slots, slots * bytes_per_token / 2**30, free / 2**30, bytes_per_token,
    )
    return slots
