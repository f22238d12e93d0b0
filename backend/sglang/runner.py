"""NativeRunner: our own model code over the paged KV pool (the ModelRunner contract)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import torch
from tqdm import tqdm
from transformers import PretrainedConfig

from backend.batch import ForwardBatch, ModelInfo
from backend.cascade import cascade_rows_per_group
from backend.kv_pool import KVPool, slots_for_free_memory
from backend.sglang.cpu_decoder import CPU_KERNEL_CHOICES, CpuDecoder, CpuKernelUnavailable
from backend.sglang.cuda_graph import (
    CudaGraphRunner,
    capture_decode_graphs,
    uses_graph_safe_kernels,
)
from backend.sglang.kernels import KernelSet, default_kernel_set, load_kernel_set
from backend.sglang.layers import CausalLM, DecoderConfig, UnsupportedModelError
from backend.sglang.models import MODEL_REGISTRY, get_model_class
from backend.sglang.piecewise_graph import PiecewiseGraphRunner
from backend.sglang.quant import WEIGHT_QUANT_CHOICES, head_quant_method
from backend.sglang.weights import checkpoint_files, init_dummy_weights, load_weights
from config import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["NativeRunner", "UnsupportedModelError"]

HEAD_WARM_MAX_ROWS = 1024  # `warm_head` stops here (a step sampling more loads a kernel)


def _architecture(hf_config: PretrainedConfig) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise UnsupportedModelError("config.json names no architecture")
    return str(architectures[0])


def _model_class(hf_config: PretrainedConfig) -> type[CausalLM]:
    architecture = _architecture(hf_config)
    model_class = get_model_class(architecture)
    if model_class is None:
        raise UnsupportedModelError(
            f"architecture {architecture} has no native implementation "
            f"(native: {', '.join(sorted(MODEL_REGISTRY))}); use BACKEND_IMPL=hf"
        )
    return model_class


def _as_ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    raise ValueError(f"eos_token_id must be an int or a list of ints, got {value!r}")


def eos_token_ids(model_path: str, hf_config: PretrainedConfig) -> tuple[int, ...]:
    """EOS ids of config.json and generation_config.json together, in order, deduplicated."""
    ids = _as_ids(getattr(hf_config, "eos_token_id", None))
    generation_path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(generation_path):
        with open(generation_path) as f:
            ids += _as_ids(json.load(f).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


class NativeRunner:
    """Owns the native model and its KV pool; runs one ForwardBatch at a time."""

    def __init__(
        self,
        model_path: str,
        hf_config: PretrainedConfig,
        *,
        dtype: torch.dtype,
        device: torch.device,
        num_kv_slots: int,
        load_format: str = "auto",
        seed: int = 0,
        kernel_set: str | None = None,
        weight_quant: str = "none",
        kv_mem_fraction: float = 0.85,
        cuda_graph: bool = False,
        cuda_graph_max_bs: int = 256,
        cpu_kernel: str = "torch",
        kernel_cache_dir: str = "",
        cascade_attention: bool = False,
        kv_dtype: torch.dtype | None = None,
        piecewise_graph_tokens: int = 0,
        max_sampled_rows: int = 0,
    ) -> None:
        """`weight_quant` (`none` | `int8` | `int4`, already resolved; see
        backend.sglang.quant) packs every matmul weight once, after loading.
        `num_kv_slots` 0 sizes the pool from `kv_mem_fraction` of the free device memory
        left after the weights. On CUDA, `cuda_graph` captures decode graphs for batches of
        up to `cuda_graph_max_bs` requests (backend.sglang.cuda_graph). `cascade_attention`
        asks for cascade decode attention (backend/cascade.py), which the runner uses when
        its kernel set has it (`self.cascade_attention`). `kv_dtype` is the KV pool's dtype
        (default: `dtype`; float8 e4m3 stores K/V in 8 bits). On CUDA with graph-safe
        kernels, `piecewise_graph_tokens` > 0 captures piecewise graphs for other steps of
        up to that many tokens (backend.sglang.piecewise_graph). On CUDA, the LM head runs
        once for every row count up to `max_sampled_rows` (`warm_head`)."""
        if weight_quant not in WEIGHT_QUANT_CHOICES:
            raise ValueError(f"unknown weight_quant {weight_quant!r}; known: "
                             f"{', '.join(WEIGHT_QUANT_CHOICES)}")
        model_class = _model_class(hf_config)
        self.device = device
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"unknown load_format {load_format!r} (auto | dummy)")
        if load_format == "auto":
            try:
                checkpoint_files(model_path)
            except FileNotFoundError as exc:  # e.g. only pytorch_model.bin: transformers reads it
                raise UnsupportedModelError(f"{exc}; the native runner reads safetensors") from None
        self.ops: KernelSet = load_kernel_set(kernel_set or default_kernel_set(device))
        self.weight_quant = weight_quant

        self.model = model_class(hf_config, self.ops, dtype, device)
        self.model.eval()
        if load_format == "dummy":
            init_dummy_weights(self.model, seed)
        else:
            load_weights(self.model, model_path)
        if weight_quant != "none":
            quantize_model(self.model, weight_quant)
        shape = self.model.config
        self.cascade_max_rows = cascade_rows_per_group(shape.num_heads, shape.num_kv_heads)
        self.cascade_attention = (cascade_attention and self.ops.CASCADE_ATTENTION
                                  and self.cascade_max_rows >= 2)
        kv_dtype = kv_dtype or dtype
        if num_kv_slots <= 0:
            per_token = KVPool.bytes_per_token(
                shape.num_layers, shape.num_kv_heads, shape.head_dim, kv_dtype
            )
            num_kv_slots = slots_for_free_memory(per_token, kv_mem_fraction, device)
        self.num_kv_slots = num_kv_slots
        self.kv_pool = KVPool(
            shape.num_layers, num_kv_slots, shape.num_kv_heads, shape.head_dim, kv_dtype, device
        )
        config = self.model.config
        self.info = ModelInfo(
            architecture=_architecture(hf_config),
            vocab_size=config.vocab_size,
            max_context_len=_max_context_len(config),
            eos_token_ids=eos_token_ids(model_path, hf_config),
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        )
        self.cuda_graphs: CudaGraphRunner | None = None
        if cuda_graph and device.type == "cuda":
            self.cuda_graphs = capture_decode_graphs(self, cuda_graph_max_bs)
        self.piecewise: PiecewiseGraphRunner | None = None
        if piecewise_graph_tokens > 0 and device.type == "cuda":
            self.piecewise = capture_piecewise_graphs(self, piecewise_graph_tokens, dtype)
        if max_sampled_rows > 0 and device.type == "cuda":
            self.warm_head(min(max_sampled_rows, HEAD_WARM_MAX_ROWS))
        self.cpu_decoder: CpuDecoder | None = None
        if device.type == "cpu" and cpu_kernel != "torch":
            self.cpu_decoder = _compiled_decoder(self.model, self.kv_pool, cpu_kernel,
                                                 kernel_cache_dir)

    @torch.inference_mode()
    def warm_head(self, max_rows: int) -> None:
        """Run the eager LM head over 1..`max_rows` rows. cuBLAS picks a kernel per row
        count, and CUDA loads a kernel on its first launch, waiting for the device to drain
        first: in a prefill or mixed step (whose head runs eagerly over the rows that
        sample) that wait cost the host its lead over the device (up to 36 ms a step under
        the profiler, docs/BENCHMARKS.md, twelfth run)."""
        started = time.perf_counter()
        embed = self.model.model.embed_tokens.weight
        hidden = torch.zeros(max_rows, embed.shape[1], dtype=embed.dtype, device=self.device)
        for rows in range(1, max_rows + 1):
            self.model.logits(hidden[:rows])
        torch.cuda.synchronize(self.device)
        logger.info("LM head warmed for 1-%d rows in %.1f s", max_rows,
                    time.perf_counter() - started)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Store the new tokens' K/V; return logits [len(logits_indices), vocab]
        in the head's dtype (see `ModelRunner.forward`)."""
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(batch):
            return self.cuda_graphs.run(batch)
        if self.piecewise is not None and self.piecewise.can_run(batch):
            return self.piecewise.run(batch)
        if self.cpu_decoder is not None:
            return self.cpu_decoder.forward(batch)
        return self.model(batch.input_ids, batch.positions, batch, self.kv_pool)


def capture_piecewise_graphs(runner: NativeRunner, max_tokens: int,
                             dtype: torch.dtype) -> PiecewiseGraphRunner | None:
    """Capture the piecewise graphs of a CUDA NativeRunner; None (logged) when its kernel
    set is not graph-safe."""
    if not uses_graph_safe_kernels(runner.ops):
        logger.warning("piecewise CUDA graphs need the triton kernel set; steps run eagerly")
        return None
    try:
        graphs = PiecewiseGraphRunner(runner.model, runner.kv_pool, max_tokens=max_tokens,
                                      dtype=dtype, device=runner.device)
    except torch.OutOfMemoryError:
        logger.warning("no memory left for the piecewise graphs' buffers; prefill and mixed "
                       "steps run eagerly")
        return None
    graphs.capture()
    return graphs


def quantize_model(model: CausalLM, method: str) -> None:
    """Pack every decoder matmul weight with `method` and the LM head with its head method
    (int8 under int4: as fast there, and the vocabulary projection is the most sensitive)."""
    layers = model.decoder_linears()
    head_method = head_quant_method(method)
    with torch.no_grad():
        for layer in tqdm(layers, desc=f"Quantizing weights ({method})", unit="matrix",
                          leave=False):
            layer.quantize(method)
        model.quantize_head(head_method)
    logger.info("weights quantized: %d matrices %s, LM head %s", len(layers), method,
                head_method)


def _compiled_decoder(model: CausalLM, kv_pool: KVPool, cpu_kernel: str,
                      cache_dir: str) -> CpuDecoder | None:
    """The compiled CPU decoder for `model`; None (logged) under `auto` when it cannot run."""
    if cpu_kernel not in CPU_KERNEL_CHOICES:
        raise ValueError(f"unknown cpu_kernel {cpu_kernel!r}; known: "
                         f"{', '.join(CPU_KERNEL_CHOICES)}")
    try:
        decoder = CpuDecoder(model, kv_pool, cache_dir or tempfile.gettempdir())
    except CpuKernelUnavailable as exc:
        if cpu_kernel == "c":
            raise ConfigError(f"CPU_KERNEL=c: {exc}") from exc
        logger.info("compiled CPU decoder not used (%s); running torch ops", exc)
        return None
    if not decoder.threaded and torch.get_num_threads() > 1 and cpu_kernel == "auto":
        logger.info("compiled CPU decoder not used (built without OpenMP: one thread); "
                    "running torch ops on %d threads", torch.get_num_threads())
        return None
    logger.info("CPU forward: compiled decoder (one C call per step)")
    return decoder


def _max_context_len(config: DecoderConfig) -> int:
    if config.max_context_len < config.max_position_embeddings:
        logger.warning(
            "sliding window %d < max_position_embeddings %d: attention is full, so the "
            "context is capped to the window",
            config.sliding_window, config.max_position_embeddings,
        )
    return config.max_context_len
