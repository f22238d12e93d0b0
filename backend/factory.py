"""Pick and build the runner for a model: native paged runner, or transformers on our pool."""

from __future__ import annotations

import logging
import os

import torch

from backend.batch import ModelRunner
from backend.loader import ModelSource
from config import Config, ConfigError

logger = logging.getLogger(__name__)


def kv_cache_tokens(config: Config, device: torch.device) -> int:
    """Slots of the KV pool: KV_CACHE_TOKENS, else KV_CACHE_CPU_TOKENS off CUDA.

    On CUDA without KV_CACHE_TOKENS the runner sizes the pool from the memory left free
    after its weights (KV_CACHE_MEM_FRACTION); this returns 0 for that case.
    """
    if config.kv_cache_tokens > 0:
        return config.kv_cache_tokens
    if device.type == "cuda":
        return 0
    return config.kv_cache_cpu_tokens


def create_runner(config: Config, source: ModelSource) -> ModelRunner:
    """BACKEND_IMPL: sgl/torch → native; hf → transformers; auto → native, else hf (logged)."""
    device = config.resolved_device()
    dtype = config.resolved_dtype()
    slots = kv_cache_tokens(config, device)
    impl = config.backend_impl
    if impl == "mlx":
        raise ConfigError("BACKEND_IMPL=mlx is not available in this build")
    if impl in ("auto", "sgl", "torch"):
        from backend.sglang.quant import resolve_weight_quant
        from backend.sglang.runner import NativeRunner, UnsupportedModelError

        try:
            return NativeRunner(
                source.path,
                source.hf_config,
                dtype=dtype,
                device=device,
                num_kv_slots=slots,
                load_format=config.load_format,
                seed=config.seed,
                weight_quant=resolve_weight_quant(config.weight_quant, config.dtype, device),
                kv_mem_fraction=config.kv_cache_mem_fraction,
                cuda_graph=config.cuda_graph,
                cuda_graph_max_bs=min(config.cuda_graph_max_bs, config.max_running_requests),
                cpu_kernel=config.cpu_kernel,
                kernel_cache_dir=os.path.join(os.path.expanduser(config.model_cache_dir),
                                              "kernels"),
            )
        except UnsupportedModelError as exc:
            if impl != "auto":
                raise
            logger.warning("native runner unavailable (%s); using the transformers runner", exc)
    from backend.hf.runner import HFRunner

    return HFRunner(
        source,
        dtype=dtype,
        device=device,
        num_kv_slots=slots,
        load_format=config.load_format,
        trust_remote_code=config.trust_remote_code,
        seed=config.seed,
        kv_mem_fraction=config.kv_cache_mem_fraction,
    )
