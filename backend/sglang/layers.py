"""Building blocks shared by the native decoder-only models (Llama, Qwen2, Qwen3, Mistral).

Modules hold parameters under Hugging Face's names, except that q/k/v projections are merged
into `qkv_proj` and gate/up into `gate_up_proj` (one matmul each); `MergedLinear.shard_rows`
says where each original projection lives. All math goes through a kernel set (`ops`) chosen
by the runner. Models take `(input_ids, positions, batch, kv_pool)` explicitly.

The per-token hot path calls submodules' `forward` directly: at decode a step is hundreds of
tiny ops, and `nn.Module.__call__` adds measurable time to each call. With quantized weights,
matmuls return bfloat16 (`quant.KERNEL_DTYPE`); the residual stream, norms and attention keep
the model's dtype, so each layer casts four times, not twice per matmul.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from backend.batch import ForwardBatch
from backend.kv_pool import KVPool
from backend.sglang.kernels import KernelSet, torch_ops
from backend.sglang.kernels.torch_ops import SplitSum, dense
from backend.sglang.quant import QuantizedWeight, quantize_head_weight, quantize_weight

logger = logging.getLogger(__name__)

# what o_proj and down_proj hand to the residual add + RMSNorm after them: a tensor, or a
# split-K layer's partial sums, which that norm adds up itself (kernels/triton/split_k.py)
Hidden = torch.Tensor | SplitSum


class UnsupportedModelError(ValueError):
    """The native runner cannot run this model (architecture or feature not implemented)."""


@dataclass(frozen=True)
class DecoderConfig:
    """The shape and options of one decoder-only model, read from a HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_hf(cls, hf_config: PretrainedConfig, **options: bool) -> DecoderConfig:
        """Read the common fields; `options` set the architecture's bias/norm switches."""
        activation = getattr(hf_config, "hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedModelError(f"activation {activation!r} is not supported (silu only)")
        num_heads = hf_config.num_attention_heads
        theta, scaling = rope_settings(hf_config)
        if (rope := torch_ops.rope_type(scaling)) not in torch_ops.ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {rope!r} is not supported (supported: "
                                        f"{', '.join(torch_ops.ROPE_TYPES)})")
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            sliding_window=effective_sliding_window(hf_config),
            **options,
        )

    @property
    def max_context_len(self) -> int:
        """Longest sequence the model serves: the sliding window caps it (full attention)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings


def rope_settings(hf_config: PretrainedConfig) -> tuple[float, dict[str, Any] | None]:
    """`(theta, scaling)` from either `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling` fields."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or params or None
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    return float(theta), scaling


def effective_sliding_window(hf_config: PretrainedConfig) -> int | None:
    """The attention window of a model whose layers slide; None when none does (no window,
    `use_sliding_window` false, or `layer_types` without a sliding layer: Qwen2 configs
    whose `max_window_layers` covers every layer)."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or not getattr(hf_config, "use_sliding_window", True):
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm; given a residual, adds it first and returns the new residual too."""

    def __init__(self, size: int, eps: float, ops: KernelSet, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: Hidden, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Module):
    """`y = x W^T (+ b)` with weights allocated uninitialised in the target dtype.

    After `quantize`, the float weight is dropped (an empty parameter stays under its name)
    and the packed weight computes instead: it takes any float input and returns
    `quant.KERNEL_DTYPE`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: KernelSet,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ops = ops
        self.weight = _empty(out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None
        self.quantized: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`x W^T + b`; into `out` when given (2-D x)."""
        if self.quantized is not None:
            result = self.quantized.matmul(x)
            if self.bias is not None:
                result.add_(self.bias)
            return result if out is None else out.copy_(result)
        return self.ops.linear(x, self.weight, self.bias, out)

    def forward_into_norm(self, x: torch.Tensor) -> Hidden:
        """`forward` for a result that only `RMSNorm.add_and_norm` reads: the kernel set may
        leave it as partial sums (`KernelSet.linear_into_norm`)."""
        if self.quantized is not None:
            return self.forward(x)
        return self.ops.linear_into_norm(x, self.weight, self.bias)

    def quantize(self, method: str, head: bool = False) -> None:
        """Pack the loaded weight (`int8` | `int4`); call once, after the weights are in.
        `head`: the LM head's packing (`quant.quantize_head_weight`)."""
        if self.quantized is not None:
            raise RuntimeError("this linear layer is already quantized")
        pack = quantize_head_weight if head else quantize_weight
        self.quantized = pack(self.weight.detach(), method)
        self.weight = _empty(0, dtype=self.weight.dtype, device=self.weight.device)


class Embedding(nn.Module):
    """Token embedding table (also the LM head when embeddings are tied)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.weight = _empty(num_embeddings, dim, dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (one matmul)."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool, ops: KernelSet,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(in_features, sum(shards.values()), bias, ops, dtype, device)
        self.shard_rows: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards.items():
            self.shard_rows[name] = (start, start + size)
            start += size


class Attention(nn.Module):
    """qkv → (q/k norm) → rope → store K/V in the pool (one `qkv_prepare` op) → paged
    attention → o_proj."""

    def __init__(self, config: DecoderConfig, layer_id: int, ops: KernelSet,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.ops = ops
        self.dtype = dtype
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = MergedLinear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            config.qkv_bias, ops, dtype, device,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_bias, ops, dtype, device)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, dtype, device)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops, dtype, device)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                batch: ForwardBatch, kv_pool: KVPool) -> torch.Tensor:
        q = self.prepare(hidden, positions, cos_sin_cache, batch.out_slots, kv_pool)
        return self.o_proj.forward(self.attend(q, batch, kv_pool))

    def prepare(self, hidden: torch.Tensor, positions: torch.Tensor,
                cos_sin_cache: torch.Tensor, out_slots: torch.Tensor,
                kv_pool: KVPool, q_out: torch.Tensor | None = None) -> torch.Tensor:
        """The work before attention, which reads no batch metadata but `positions` and
        `out_slots`: the qkv projection, q/k norms and rotary, and the new K/V stored at
        `out_slots`. Returns q [T, Hq, D] (`q_out`, contiguous, when given)."""
        qkv = self.qkv_proj.forward(hidden).to(self.dtype)
        q_norm, k_norm = self.q_norm, self.k_norm
        return self.ops.qkv_prepare(
            qkv, self.num_heads, self.num_kv_heads, positions, cos_sin_cache,
            q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None,
            q_norm.eps if q_norm is not None else 0.0,
            kv_pool.k[self.layer_id], kv_pool.v[self.layer_id], out_slots, q_out,
        )

    def attend(self, q: torch.Tensor, batch: ForwardBatch, kv_pool: KVPool,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Paged attention of q [T, Hq, D] over the batch's KV: [T, Hq * D] (`out`, a
        contiguous [T, Hq * D] tensor, when given)."""
        result = self.ops.paged_attention(
            q, kv_pool.k[self.layer_id], kv_pool.v[self.layer_id], batch, self.scale,
            self.num_kv_heads, None if out is None else out.view(q.shape),
        )
        return result.reshape(q.shape[0], self.q_size)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) with gate and up merged."""

    def __init__(self, config: DecoderConfig, ops: KernelSet, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.ops = ops
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(
            config.hidden_size, {"gate": size, "up": size}, config.mlp_bias, ops, dtype, device
        )
        self.down_proj = Linear(size, config.hidden_size, config.mlp_bias, ops, dtype, device)

    def forward(self, x: torch.Tensor) -> Hidden:
        """The block's output, for the next residual add + RMSNorm (`Linear.forward_into_norm`)."""
        return self.down_proj.forward_into_norm(
            self.ops.silu_and_mul(self.gate_up_proj.forward(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; carries the residual stream separately so norms can fuse the add."""

    def __init__(self, config: DecoderConfig, layer_id: int, ops: KernelSet,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.self_attn = Attention(config, layer_id, ops, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype, device)
        self.mlp = MLP(config, ops, dtype, device)

    def forward(self, hidden: Hidden, residual: torch.Tensor | None,
                positions: torch.Tensor, cos_sin_cache: torch.Tensor, batch: ForwardBatch,
                kv_pool: KVPool) -> tuple[Hidden, torch.Tensor]:
        q, residual = self.before_attention(hidden, residual, positions, cos_sin_cache,
                                            batch.out_slots, kv_pool)
        return self.after_attention(self.self_attn.attend(q, batch, kv_pool), residual)

    def before_attention(self, hidden: Hidden, residual: torch.Tensor | None,
                         positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                         out_slots: torch.Tensor, kv_pool: KVPool,
                         q_out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input norm and `Attention.prepare` (q into `q_out` when given): (q,
        residual). Shapes follow the token count only, so piecewise CUDA graphs capture
        it."""
        if residual is None:
            residual = dense(hidden)
            normed = self.input_layernorm.forward(residual)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        q = self.self_attn.prepare(normed, positions, cos_sin_cache, out_slots, kv_pool, q_out)
        return q, residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[Hidden, torch.Tensor]:
        """o_proj, the post-attention norm and the MLP: (hidden, residual)."""
        hidden = self.self_attn.o_proj.forward_into_norm(attn_out)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp.forward(hidden), residual


class DecoderModel(nn.Module):
    """Token embedding → decoder layers → (final norm applied by the LM wrapper)."""

    def __init__(self, config: DecoderConfig, ops: KernelSet, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, ops, dtype, device) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)


class CausalLM(nn.Module):
    """A decoder-only LM over the paged KV pool; subclasses pick the architecture options."""

    def __init__(self, hf_config: PretrainedConfig, ops: KernelSet, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.config = self.decoder_config(hf_config)
        self.ops = ops
        self.model = DecoderModel(self.config, ops, dtype, device)
        self.lm_head: Linear | None = None
        self.tied_head: QuantizedWeight | None = None  # quantized copy of the tied embedding
        if not self.config.tie_word_embeddings:
            self.lm_head = Linear(self.config.hidden_size, self.config.vocab_size, False, ops,
                                  dtype, device)
        self.cos_sin_cache = ops.build_rope_cache(
            self.config.head_dim, self.config.max_position_embeddings, self.config.rope_theta,
            self.config.rope_scaling, device,
        )

    @classmethod
    def decoder_config(cls, hf_config: PretrainedConfig) -> DecoderConfig:
        """The architecture's reading of its HF config."""
        return DecoderConfig.from_hf(hf_config)

    def decoder_linears(self) -> list[Linear]:
        """The matmul layers of the decoder blocks (the LM head not included)."""
        return [m for m in self.model.modules() if isinstance(m, Linear)]

    def quantize_head(self, method: str) -> None:
        """Pack the LM head; a tied one gets a packed copy (the lookup table stays float)."""
        if self.lm_head is not None:
            self.lm_head.quantize(method, head=True)
        else:
            self.tied_head = quantize_head_weight(self.model.embed_tokens.weight.detach(), method)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of normed hidden rows, in the head's output dtype (bfloat16 for
        a bfloat16 model): the sampler widens them only where it computes with them. Into
        `out` when given (a decode graph's static logits buffer: no copy after the head)."""
        if self.lm_head is not None:
            return self.lm_head.forward(hidden, out)
        if self.tied_head is not None:
            result = self.tied_head.matmul(hidden)
            return result if out is None else out.copy_(result)
        return torch_ops.linear(hidden, self.model.embed_tokens.weight, None, out)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                kv_pool: KVPool, logits_out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] of the rows that sample (`logits`),
        into `logits_out` when given."""
        self.ops.prepare_attention(batch)
        hidden: Hidden = self.model.embed_tokens.forward(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.model.layers:
            hidden, residual = layer.forward(hidden, residual, positions, self.cos_sin_cache,
                                             batch, kv_pool)
        assert residual is not None
        return self.head(hidden, residual, None if samples_every_row(batch)
                         else batch.logits_indices, logits_out)

    def head(self, hidden: Hidden, residual: torch.Tensor,
             rows: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last layer's `rows` (all when None): final norm, LM head (into
        `out` when given)."""
        if rows is not None:
            hidden, residual = dense(hidden).index_select(0, rows), residual.index_select(0, rows)
        hidden, _ = self.model.norm.add_and_norm(hidden, residual)
        return self.logits(hidden, out)


def samples_every_row(batch: ForwardBatch) -> bool:
    """Whether `logits_indices` are all rows in order (a decode step where every request
    samples), so no rows need selecting."""
    return batch.is_decode and batch.logits_indices.shape[0] == batch.num_tokens
