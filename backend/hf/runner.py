"""Any transformers causal LM on our paged KV pool, behind the ModelRunner contract.

The model is loaded with `attn_implementation="minisgl_paged"`, an attention function
registered with transformers' `AttentionInterface`. Transformers computes everything but
attention (embeddings, norms, RoPE from our positions, MLPs, the LM head); our function
receives each layer's post-RoPE query/key/value of the step's new tokens, stores K/V into the
pool at the batch's `out_slots` and attends over each request's `kv_indices`. The step's
ForwardBatch and the pool travel down through the model call's keyword arguments, which
transformers passes on to the attention function untouched. All requests of a step are
packed into one row: input_ids [1, T], position_ids [1, T], no HF cache, no mask.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import TYPE_CHECKING, Any, cast

import torch

from backend.batch import ForwardBatch, ModelInfo, build_forward_batch
from backend.kv_pool import KVPool, slots_for_free_memory
from backend.loader import ModelSource, declared_context_len, eos_token_ids
from backend.sglang.kernels import torch_ops

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "minisgl_paged"
_BATCH_KWARG = "minisgl_batch"
_POOL_KWARG = "minisgl_pool"
_TRACE_KWARG = "minisgl_trace"
_UNSUPPORTED_KWARGS = ("s_aux",)


class UnsupportedModelError(RuntimeError):
    """The model cannot run on the paged pool (it does not route through AttentionInterface)."""


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `minisgl_paged` attention: query [1, Hq, T, D], key/value [1, Hkv, T, D] in,
    attn_output [1, T, Hq, D] out (the layout of transformers' sdpa_attention_forward)."""
    batch: ForwardBatch | None = kwargs.get(_BATCH_KWARG)
    pool: KVPool | None = kwargs.get(_POOL_KWARG)
    if batch is None or pool is None:
        raise RuntimeError("minisgl_paged attention runs only inside HFRunner.forward")
    layer = cast(int, module.layer_idx)
    trace: list[tuple[int, tuple[int, ...], dict[str, Any]]] | None = kwargs.get(_TRACE_KWARG)
    if trace is not None:
        trace.append((layer, tuple(key.shape), kwargs))
    pool.store(layer, batch.out_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    sliding_window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    window_matters = sliding_window is not None and max(batch.seq_lens) > sliding_window
    if window_matters or softcap is not None:
        out = windowed_paged_attention(
            q, pool.k[layer], pool.v[layer], batch, scale, sliding_window, softcap
        )
    else:
        out = torch_ops.paged_attention(
            q, pool.k[layer], pool.v[layer], batch, scale, pool.k[layer].shape[1]
        )
    return out.unsqueeze(0), None


def windowed_paged_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Paged causal attention with an optional sliding window and logit soft-capping.

    q [T, Hq, D] → [T, Hq, D]; one request at a time, scores in float32. A query at
    position p sees keys at positions in (p - sliding_window, p], as transformers' masks do.
    """
    out = torch.empty_like(q)
    q_start = kv_start = 0
    for seq_len, extend_len in zip(batch.seq_lens, batch.extend_lens):
        slots = batch.kv_indices[kv_start : kv_start + seq_len]
        q_rows = q[q_start : q_start + extend_len].transpose(0, 1).float()
        k = k_pool_layer[slots].transpose(0, 1).float()
        v = v_pool_layer[slots].transpose(0, 1).float()
        group = q_rows.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        scores = q_rows @ k.transpose(1, 2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        visible = _visible_keys(seq_len, extend_len, sliding_window, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        rows = torch.softmax(scores, dim=-1) @ v
        out[q_start : q_start + extend_len] = rows.transpose(0, 1).to(q.dtype)
        q_start += extend_len
        kv_start += seq_len
    return out


def _visible_keys(
    seq_len: int, extend_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    query_pos = torch.arange(seq_len - extend_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class HFRunner:
    """A transformers causal LM whose attention reads and writes our paged KV pool."""

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: torch.dtype,
        device: torch.device,
        num_kv_slots: int,
        load_format: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        kv_mem_fraction: float = 0.85,
    ) -> None:
        _register_attention()
        self.device = torch.device(device)
        self.model = _load_model(source, dtype, self.device, load_format, trust_remote_code, seed)
        self._accepts_logits_to_keep = (
            "logits_to_keep" in inspect.signature(self.model.forward).parameters
        )
        self.info = _model_info(source, self.model)
        if num_kv_slots <= 0:
            per_token = KVPool.bytes_per_token(
                self.info.num_layers, self.info.num_kv_heads, self.info.head_dim, dtype
            )
            num_kv_slots = slots_for_free_memory(per_token, kv_mem_fraction, self.device)
        self.num_kv_slots = num_kv_slots
        self.pool = KVPool(
            self.info.num_layers,
            num_kv_slots,
            self.info.num_kv_heads,
            self.info.head_dim,
            dtype,
            self.device,
        )
        self._check_routes_through_pool()
        self._check_no_state_outside_the_pool()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Store the new tokens' K/V at their slots; float32 logits of `logits_indices` rows."""
        return self._run(batch, trace=None)

    def _run(self, batch: ForwardBatch, trace: list[Any] | None) -> torch.Tensor:
        extra: dict[str, Any] = {_BATCH_KWARG: batch, _POOL_KWARG: self.pool}
        if trace is not None:
            extra[_TRACE_KWARG] = trace
        if self._accepts_logits_to_keep:
            extra["logits_to_keep"] = batch.logits_indices
        output = self.model(
            input_ids=batch.input_ids.unsqueeze(0),
            position_ids=batch.positions.unsqueeze(0),
            attention_mask=None,
            use_cache=False,
            **extra,
        )
        logits = output.logits[0]
        if not self._accepts_logits_to_keep:
            logits = logits[batch.logits_indices]
        return logits.float()

    def _clear_padding_slot(self) -> None:
        for k_layer, v_layer in zip(self.pool.k, self.pool.v):
            k_layer[0].zero_()
            v_layer[0].zero_()

    @torch.inference_mode()
    def _check_routes_through_pool(self) -> None:
        """Run two tokens on the padding slot; every layer must attend through the pool."""
        name = type(self.model).__name__
        probe = build_forward_batch([[0, 0]], [0], [[0, 0]], [True], self.device)
        trace: list[tuple[int, tuple[int, ...], dict[str, Any]]] = []
        try:
            self._run(probe, trace)
        except Exception as exc:
            raise UnsupportedModelError(f"{name} failed on the paged KV pool: {exc}") from exc
        finally:
            self._clear_padding_slot()
        layers = sorted(layer for layer, _, _ in trace)
        if layers != list(range(self.info.num_layers)):
            raise UnsupportedModelError(
                f"{name} does not route every layer's attention through transformers' "
                f"AttentionInterface (saw layers {layers}, expected {self.info.num_layers})"
            )
        pool_shape = (self.info.num_kv_heads, self.info.head_dim)
        for layer, key_shape, kwargs in trace:
            if (key_shape[1], key_shape[3]) != pool_shape:
                raise UnsupportedModelError(
                    f"{name} layer {layer} has K/V heads {key_shape[1]}x{key_shape[3]}; "
                    f"the pool holds {pool_shape[0]}x{pool_shape[1]}"
                )
            for unsupported in _UNSUPPORTED_KWARGS:
                if kwargs.get(unsupported) is not None:
                    raise UnsupportedModelError(f"{name} needs attention {unsupported!r}")

    @torch.inference_mode()
    def _check_no_state_outside_the_pool(self) -> None:
        """A decode step over the pool must give the last row of a whole prefill: a model
        that carries other state from step to step (the Mamba or convolution layers of
        hybrid models), dropped here with `use_cache=False`, gets the prefill right and
        every later token wrong."""
        name = type(self.model).__name__
        count = min(_STATE_PROBE_TOKENS, self.num_kv_slots)
        tokens = [(7 * i + 3) % self.info.vocab_size for i in range(count)]
        slots = list(range(1, count + 1))
        try:
            whole = self.forward(build_forward_batch([tokens], [0], [slots], [True],
                                                     self.device))
            self.forward(build_forward_batch([tokens[:-1]], [0], [slots[:-1]], [False],
                                             self.device))
            step = self.forward(build_forward_batch([tokens[-1:]], [count - 1], [slots], [True],
                                                    self.device))
        finally:
            self._clear_padding_slot()
        scale = float(whole.abs().max()) or 1.0
        drift = float((whole - step).abs().max()) / scale
        tolerance = _STATE_PROBE_TOLERANCE.get(self.pool.k[0].dtype, 3e-2)
        if not drift <= tolerance:
            raise UnsupportedModelError(
                f"{name} keeps state outside attention (a decode step differs from the prefill "
                f"by {drift:.2g} of the logits' scale): the paged runner cannot serve it")


# tokens of the start-up probe for state outside the KV pool, and how far (relative to the
# logits' scale) a decode step may differ from the prefill in each dtype (rounding only)
_STATE_PROBE_TOKENS = 6
_STATE_PROBE_TOLERANCE = {torch.float32: 1e-4}


def _load_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    trust_remote_code: bool,
    seed: int,
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        if load_format == "dummy":
            torch.manual_seed(seed)
            with device:
                model = AutoModelForCausalLM.from_config(
                    copy.deepcopy(source.hf_config),
                    dtype=dtype,
                    attn_implementation=ATTN_IMPLEMENTATION,
                    trust_remote_code=trust_remote_code,
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.path,
                dtype=dtype,
                attn_implementation=ATTN_IMPLEMENTATION,
                trust_remote_code=trust_remote_code,
            )
    except (ValueError, KeyError) as exc:  # KeyError: a model with its own attention table
        raise UnsupportedModelError(
            f"{source.name} cannot use a custom attention implementation: {exc!r}"
        ) from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# rope types whose frequencies transformers picks per forward from the longest position in
# it, switching below the declared context: in a batch packed into one row, a short request
# would get a long one's rotation (dynamic NTK switches only past the declared context,
# which the runner never serves)
_LENGTH_DEPENDENT_ROPE = ("longrope",)


def _context_len(text_config: Any) -> int:
    """The declared context, capped at the original one for a length-dependent rope type:
    below it the rotation never switches, so every request's output is what it would be
    alone."""
    declared = declared_context_len(text_config)
    rope = (getattr(text_config, "rope_parameters", None)
            or getattr(text_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type not in _LENGTH_DEPENDENT_ROPE:
        return declared
    original = (rope.get("original_max_position_embeddings")
                or getattr(text_config, "original_max_position_embeddings", None) or declared)
    if int(original) < declared:
        logger.warning(
            "rope type %s switches its frequencies past %d tokens, per forward, from the "
            "longest position of the batch: serving a context of %d tokens (of %d declared) "
            "so that no request's output depends on the others", rope_type, original,
            original, declared)
    return min(declared, int(original))


def _model_info(source: ModelSource, model: PreTrainedModel) -> ModelInfo:
    text_config = source.hf_config.get_text_config()
    num_heads = getattr(text_config, "num_attention_heads", None)
    if not num_heads:
        raise UnsupportedModelError(
            f"{source.name} declares no attention heads; it cannot use the paged KV pool"
        )
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    architectures = getattr(source.hf_config, "architectures", None) or [type(model).__name__]
    return ModelInfo(
        architecture=architectures[0],
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        max_context_len=_context_len(text_config),
        eos_token_ids=eos_token_ids(source),
        num_layers=text_config.num_hidden_layers,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
    )

