"""Pick and build the engine and runner for a model: the native paged runner, transformers
on our pool (both in `engine.engine.Engine`), or mlx-lm in its own `MLXEngine`."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from backend.batch import ModelRunner
from backend.loader import ModelSource
from backend.mlx import is_apple_silicon, mlx_importable, require_mlx
from config import Config, ConfigError, resolve_dtype

if TYPE_CHECKING:
    from engine.base import EngineBase

logger = logging.getLogger(__name__)


CPU_KV_RAM_FRACTION = 0.25  # most of the available RAM the default CPU/MPS pool takes


def kv_cache_tokens(config: Config, device: torch.device, bytes_per_token: int = 0) -> int:
    """Slots of the KV pool: KV_CACHE_TOKENS, else KV_CACHE_CPU_TOKENS off CUDA, cut to what
    fits in CPU_KV_RAM_FRACTION of the available RAM (`bytes_per_token` of K/V a token).

    On CUDA without KV_CACHE_TOKENS the runner sizes the pool from the memory left free
    after its weights (KV_CACHE_MEM_FRACTION); this returns 0 for that case.
    """
    if config.kv_cache_tokens > 0:
        return config.kv_cache_tokens
    if device.type == "cuda":
        return 0
    tokens = config.kv_cache_cpu_tokens
    available = available_ram_bytes()
    if bytes_per_token and available:
        fits = max(16, int(available * CPU_KV_RAM_FRACTION) // bytes_per_token)
        if fits < tokens:
            logger.warning("KV pool: %d tokens instead of KV_CACHE_CPU_TOKENS=%d, to stay within "
                           "%.0f%% of the %.1f GiB of RAM available (%d bytes a token)", fits,
                           tokens, 100 * CPU_KV_RAM_FRACTION, available / 2**30, bytes_per_token)
            tokens = fits
    return tokens


def available_ram_bytes() -> int:
    """RAM available to new allocations (Linux: MemAvailable; elsewhere the physical RAM);
    0 when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def kv_bytes_per_token(config: Config, hf_config: Any) -> int:
    """K and V bytes one token takes in the pool, from the model's config.json (0 when its
    text config does not say)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    try:
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        layers = int(text.num_hidden_layers)
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0
    itemsize = torch.empty((), dtype=config.resolved_kv_dtype()).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def check_kv_cache_dtype(config: Config, device: torch.device) -> None:
    """KV_CACHE_DTYPE=fp8_e4m3 needs float8 on the device: CUDA cards of compute capability
    8.9 or later (Ada, Hopper and newer; Triton has no float8 e4m3 before), or the CPU."""
    if config.kv_cache_dtype == "auto":
        return
    if device.type == "mps":
        raise ConfigError(f"KV_CACHE_DTYPE={config.kv_cache_dtype}: MPS has no float8 tensors")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"KV_CACHE_DTYPE={config.kv_cache_dtype} needs a GPU of compute "
                          f"capability 8.9 or later (this one: "
                          f"{torch.cuda.get_device_capability(device)})")


def resolve_backend(config: Config) -> str:
    """BACKEND_IMPL with `auto` settled between mlx and the torch runners: "mlx" when forced
    (MLX must import, else a ConfigError says how to install it) or, under auto, on Apple
    Silicon with DEVICE auto or mps, real weights, and mlx + mlx-lm importable; else the
    flag's own value (auto then means native, falling back to hf)."""
    impl = config.backend_impl
    if impl == "mlx":
        require_mlx()
        return "mlx"
    if (impl == "auto" and config.device in ("auto", "mps") and config.load_format != "dummy"
            and is_apple_silicon() and mlx_importable()):
        return "mlx"
    return impl


def create_engine(config: Config, source: ModelSource | None = None) -> EngineBase:
    """The engine BACKEND_IMPL resolves to: MLXEngine for mlx, else the native Engine."""
    if resolve_backend(config) == "mlx":
        from backend.mlx.engine import MLXEngine

        if config.cascade_attention == "1":
            raise ConfigError("CASCADE_ATTENTION=1 needs the native runner; the MLX engine "
                              "has no cascade attention")
        if config.kv_cache_dtype != "auto":
            raise ConfigError(f"KV_CACHE_DTYPE={config.kv_cache_dtype} needs the native "
                              "runner; the MLX engine keeps mlx-lm's own cache")
        return MLXEngine(config, source=source)
    from engine.engine import Engine

    return Engine(config, source=source)


def create_runner(config: Config, source: ModelSource) -> ModelRunner:
    """BACKEND_IMPL: sgl/torch → native; hf → transformers; auto → native, else hf (logged)."""
    device = config.resolved_device()
    dtype = config.resolved_dtype()
    slots = kv_cache_tokens(config, device, kv_bytes_per_token(config, source.hf_config))
    impl = config.backend_impl
    if impl == "mlx":
        raise ConfigError("BACKEND_IMPL=mlx runs in its own engine: build engines with "
                          "backend.factory.create_engine (the server and pool do)")
    check_kv_cache_dtype(config, device)
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
                piecewise_graph_tokens=(config.resolved_chunked_prefill_size(device)
                                        if config.piecewise_cuda_graph else 0),
                max_sampled_rows=config.max_running_requests,
                cpu_kernel=config.cpu_kernel,
                cascade_attention=config.cascade_attention != "0",
                kv_dtype=config.resolved_kv_dtype(),
                kernel_cache_dir=os.path.join(os.path.expanduser(config.model_cache_dir),
                                              "kernels"),
            )
        except UnsupportedModelError as exc:
            if impl != "auto":
                raise
            logger.warning("native runner unavailable (%s); using the transformers runner", exc)
    if config.kv_cache_dtype != "auto":
        raise ConfigError(f"KV_CACHE_DTYPE={config.kv_cache_dtype} needs the native runner; "
                          "the transformers runner keeps K/V in DTYPE")
    from backend.hf.runner import HFRunner

    return HFRunner(
        source,
        dtype=resolve_dtype(config.dtype, device),  # (float32 on CPU was for the C decoder)
        device=device,
        num_kv_slots=slots,
        load_format=config.load_format,
        trust_remote_code=config.trust_remote_code,
        seed=config.seed,
        kv_mem_fraction=config.kv_cache_mem_fraction,
    )
