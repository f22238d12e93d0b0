"""An mlx-lm model loaded from our resolved model folder, on the MLX device DEVICE names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import load_model

from backend.batch import ModelInfo
from backend.loader import ModelLoadError, ModelSource, declared_context_len, eos_token_ids
from config import Config, ConfigError

logger = logging.getLogger(__name__)

# tokens at the start a rotating cache never drops: none, since mlx-lm's batched rotating
# cache (BatchRotatingKVCache) merges and extracts sequences without them
ROTATING_KEEP = 0
MLX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def mlx_device(name: str) -> mx.Device:
    """DEVICE as an MLX device: cpu, mps (the Metal GPU), or auto (MLX's default)."""
    if name == "cpu":
        return mx.Device(mx.cpu)
    if name == "mps":
        if not mx.metal.is_available():
            raise ConfigError("DEVICE=mps but MLX has no Metal GPU here")
        return mx.Device(mx.gpu)
    if name == "auto":
        return mx.default_device()
    raise ConfigError(f"BACKEND_IMPL=mlx runs on cpu or mps, not DEVICE={name}")


class MLXModel:
    """The mlx-lm model of `source`, its stream, and what the engine needs to know of it."""

    def __init__(self, config: Config, source: ModelSource) -> None:
        if config.load_format == "dummy":
            raise ConfigError("LOAD_FORMAT=dummy is not supported with BACKEND_IMPL=mlx")
        self.mx_device = mlx_device(config.device)
        self.device = f"mlx:{'gpu' if self.mx_device == mx.gpu else 'cpu'}"
        self.model = _load(source, config)
        # after the load: a stream made before a failed one outlived the error and aborted
        # the interpreter at exit
        self.stream = mx.new_stream(self.mx_device)
        if config.dtype != "auto":
            self.model.set_dtype(MLX_DTYPES[config.dtype])
        self.max_kv_size = config.mlx_max_kv_size or None
        self.info = _model_info(self.model, source)
        logger.info("mlx-lm model %s on %s (%s)", source.name, self.device, self.dtype)

    @property
    def dtype(self) -> str:
        """The dtype of the model's first parameter (its compute dtype)."""
        flat: Any = tree_flatten(self.model.parameters())
        return str(flat[0][1].dtype)

    def make_cache(self) -> list[Any]:
        """An empty KV cache for one sequence: the model's own, with every full-attention
        layer's cache rotating over the latest MLX_MAX_KV_SIZE tokens when set."""
        cache = make_prompt_cache(self.model)
        if self.max_kv_size is None:
            return cache
        return [RotatingKVCache(max_size=self.max_kv_size, keep=ROTATING_KEEP)
                if type(layer) is KVCache else layer for layer in cache]


def _load(source: ModelSource, config: Config) -> nn.Module:
    try:
        model, _ = load_model(Path(source.path), trust_remote_code=config.trust_remote_code)
    except (ValueError, FileNotFoundError) as exc:
        raise ModelLoadError(f"mlx-lm cannot load {source.path}: {exc}") from exc
    return model


def _model_info(model: nn.Module, source: ModelSource) -> ModelInfo:
    text_config = source.hf_config.get_text_config()
    num_heads = int(getattr(text_config, "num_attention_heads", 1) or 1)
    hidden = int(getattr(text_config, "hidden_size", 0) or 0)
    head_dim = getattr(text_config, "head_dim", None) or (hidden // num_heads)
    vocab = getattr(text_config, "vocab_size", None)
    if not vocab:
        raise ModelLoadError(f"the config of {source.path} declares no vocab_size")
    return ModelInfo(
        architecture=(source.hf_config.architectures or [type(model).__module__])[0],
        vocab_size=int(vocab),
        max_context_len=declared_context_len(text_config),
        eos_token_ids=eos_token_ids(source),
        num_layers=len(model.layers),
        num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
    )
