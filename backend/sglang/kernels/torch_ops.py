"""The torch kernel set: pure-torch ops, the reference semantics for every other set.

Numerics follow Hugging Face's Llama/Qwen modules: norms and rotary tables are computed in
float32 and cast back to the activation dtype at the same points, so float32 results agree
with transformers to float rounding.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from backend.batch import ForwardBatch
from backend.kv_pool import to_pool_dtype

_ROPE_TYPE_KEYS = ("rope_type", "type")
ROPE_TYPES = ("default", "linear", "llama3")  # the rotary scalings `_inv_freq` computes
_T = TypeVar("_T")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim in float32, cast back, then scale by `weight`; the result
    has x's dtype (float32 weights over bfloat16 activations scale in float32 first)."""
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, shape, weight, eps)
    if weight.dtype != x.dtype:
        return F.rms_norm(x.float(), shape, weight.float(), eps).to(x.dtype)
    return weight * F.rms_norm(x.float(), shape, None, eps).to(x.dtype)


@dataclass(frozen=True)
class SplitSum:
    """`sum(partials[s] for s in range(splits))` [rows, out] in `dtype`, not yet added up:
    partials [splits, rows, out] float32."""

    partials: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.partials.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.partials.device

    def total(self) -> torch.Tensor:
        """The sum as a plain tensor (rounded once, to `dtype`)."""
        return self.partials.sum(dim=0).to(self.dtype)


def dense(x: torch.Tensor | SplitSum) -> torch.Tensor:
    """`x` as a plain tensor (a `SplitSum` added up)."""
    return x.total() if isinstance(x, SplitSum) else x


def fused_add_rms_norm(
    x: torch.Tensor | SplitSum, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(rms_norm(x + residual), x + residual)` (x added up first when it is a
    `SplitSum`)."""
    new_residual = residual + dense(x)
    return rms_norm(new_residual, weight, eps), new_residual


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`x W^T + b` (weight [out, in], as nn.Linear stores it), for a 2-D x into `out` when
    given (the same cuBLAS call as `F.linear`, writing where the caller wants the result)."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def linear_into_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor | SplitSum:
    """`linear` for a result that only `fused_add_rms_norm` reads (o_proj, down_proj): a
    kernel set may return it as a `SplitSum`; here it is always the plain product."""
    return linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x = [gate | up]` on the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """The rotary scaling kind named by a HF `rope_scaling`/`rope_parameters` dict."""
    if not rope_scaling:
        return "default"
    for key in _ROPE_TYPE_KEYS:
        if rope_scaling.get(key):
            return str(rope_scaling[key])
    return "default"


def _inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    kind = rope_type(rope_scaling)
    if kind == "default":
        return inv_freq
    assert rope_scaling is not None
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise NotImplementedError(
        f"rope type {kind!r} is not supported by the native runner "
        f"(supported: {', '.join(ROPE_TYPES)}); use BACKEND_IMPL=hf for this model"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int,
    max_pos: int,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    device: torch.device,
) -> torch.Tensor:
    """float32 `[max_pos, head_dim]` table: `cos` of each position's angles, then `sin`."""
    inv_freq = _inv_freq(head_dim, theta, rope_scaling).to(device)
    positions = torch.arange(max_pos, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class _StepMemo:
    """One value derived from a few live objects, kept while they stay the same objects:
    tables built once per forward step and shared by every layer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[tuple[weakref.ref[Any], ...], tuple[Any, ...]] | None = None
        self._value: Any = None

    def get(self, objects: tuple[Any, ...], extra: tuple[Any, ...],
            build: Callable[[], _T]) -> _T:
        with self._lock:
            if self._key is not None and self._key[1] == extra and all(
                ref() is obj for ref, obj in zip(self._key[0], objects, strict=True)
            ):
                return self._value  # type: ignore[no-any-return]
        value = build()
        with self._lock:
            self._key = (tuple(weakref.ref(obj) for obj in objects), extra)
            self._value = value
        return value


_rotary_memo = _StepMemo()


def _rotary_tables(
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, signed_sin)` [T, 1, D] of the positions: `cos` of each angle twice, and
    `[-sin, sin]`, so that rotate_half(x) * sin == swap_halves(x) * signed_sin."""
    cos, sin = cos_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1).chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding of q [T, Hq, D] and k [T, Hkv, D].

    The position tables are gathered once per `positions` tensor (once per step)."""
    cos, signed_sin = _rotary_memo.get(
        (positions, cos_sin_cache), (q.dtype,),
        lambda: _rotary_tables(positions, cos_sin_cache, q.dtype),
    )
    qk = torch.cat((q, k), dim=1)
    first, second = qk.chunk(2, dim=-1)
    swapped = torch.cat((second, first), dim=-1)
    rotated = torch.addcmul(qk * cos, swapped, signed_sin)
    q_rotated, k_rotated = rotated.split((q.shape[1], k.shape[1]), dim=1)
    return q_rotated, k_rotated


@dataclass(frozen=True)
class _ExtendSpan:
    """One request that adds several tokens: its rows of q and its KV slots."""

    q_start: int
    q_end: int
    kv_slots: torch.Tensor
    causal_mask: torch.Tensor | None  # None: plain causal (no cached prefix)


@dataclass(frozen=True)
class _AttentionPlan:
    """Per-step attention metadata, shared by every layer of one forward."""

    decode_rows: torch.Tensor | None  # rows of q that are decode requests; None: all rows
    decode_slots: torch.Tensor | None  # [Bd, Lmax] KV slots of decode requests
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] bool; None: no padding
    decode_run: tuple[int, int] | None  # one decode request on slots [start, end): a view
    extends: tuple[_ExtendSpan, ...]


_plan_lock = threading.Lock()
_last_plan: tuple[weakref.ref[ForwardBatch], _AttentionPlan] | None = None


def _plan_for(batch: ForwardBatch) -> _AttentionPlan:
    """The batch's attention plan, built once and reused by the following layers."""
    global _last_plan
    with _plan_lock:
        if _last_plan is not None and _last_plan[0]() is batch:
            return _last_plan[1]
    plan = _build_plan(batch)
    with _plan_lock:
        _last_plan = (weakref.ref(batch), plan)
    return plan


def _build_plan(batch: ForwardBatch) -> _AttentionPlan:
    decode_reqs: list[int] = []
    extends: list[_ExtendSpan] = []
    q_start = kv_start = 0
    device = batch.kv_indices.device
    for b, (seq_len, extend_len) in enumerate(zip(batch.seq_lens, batch.extend_lens)):
        if extend_len == 1:
            decode_reqs.append(b)
        else:
            slots = batch.kv_indices[kv_start : kv_start + seq_len]
            mask = _prefix_causal_mask(extend_len, seq_len, device)
            extends.append(_ExtendSpan(q_start, q_start + extend_len, slots, mask))
        q_start += extend_len
        kv_start += seq_len
    if not decode_reqs:
        return _AttentionPlan(None, None, None, None, tuple(extends))
    slots, mask = _decode_slots(batch, decode_reqs)
    rows = None if not extends else _decode_rows(batch, decode_reqs)
    run = _slot_run(slots) if not extends and batch.batch_size == 1 else None
    return _AttentionPlan(rows, slots, mask, run, tuple(extends))


def _slot_run(slots: torch.Tensor) -> tuple[int, int] | None:
    """`(start, end)` when the one request's slots [1, L] are consecutive, else None."""
    start = int(slots[0, 0])
    end = start + slots.shape[1]
    if int(slots[0, -1]) != end - 1:
        return None
    consecutive = torch.arange(start, end, dtype=slots.dtype, device=slots.device)
    return (start, end) if torch.equal(slots[0], consecutive) else None


def _prefix_causal_mask(extend_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    prefix_len = seq_len - extend_len
    if prefix_len == 0:
        return None
    ones = torch.ones(extend_len, seq_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=prefix_len)


def _decode_rows(batch: ForwardBatch, decode_reqs: list[int]) -> torch.Tensor:
    q_offsets = [0]
    for extend_len in batch.extend_lens:
        q_offsets.append(q_offsets[-1] + extend_len)
    rows = [q_offsets[b] for b in decode_reqs]
    return torch.tensor(rows, dtype=torch.int64).to(batch.kv_indices.device)


def _decode_slots(
    batch: ForwardBatch, decode_reqs: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KV slots of the decode requests padded to the longest, and the padding mask."""
    seq_lens = [batch.seq_lens[b] for b in decode_reqs]
    max_len = max(seq_lens)
    if len(decode_reqs) == batch.batch_size and min(seq_lens) == max_len:
        return batch.kv_indices.view(len(seq_lens), max_len), None
    device = batch.kv_indices.device
    reqs = torch.tensor(decode_reqs, dtype=torch.int64).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int64).to(device)
    offsets = torch.arange(max_len, dtype=torch.int64, device=device)
    valid = offsets[None, :] < lens[:, None]
    flat = torch.where(valid, batch.kv_indptr[reqs][:, None] + offsets[None, :], 0)
    return batch.kv_indices[flat], valid[:, None, None, :]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    causal: bool,
) -> torch.Tensor:
    """SDPA over q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; returns [B, Tq, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def store_kv(
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write k, v [T, Hkv, D] into the pool rows `slots` [T] (cast to the pool's dtype)."""
    k_pool_layer[slots] = to_pool_dtype(k, k_pool_layer)
    v_pool_layer[slots] = to_pool_dtype(v, v_pool_layer)


def qkv_prepare(
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
    """From a fused projection qkv [T, (Hq + 2 Hkv) D]: q/k RMS norms (Qwen3; both or
    neither), rotary on q and k, K and V stored at `slots`; returns q [T, Hq, D] (`out`,
    when given)."""
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_q_heads + 2 * num_kv_heads)
    q, k, v = qkv.split(
        (num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim), dim=-1
    )
    q = q.view(num_tokens, num_q_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if q_norm is not None and k_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    store_kv(k_pool_layer, v_pool_layer, slots, k, v)
    return q if out is None else out.copy_(q)


CASCADE_ATTENTION = False  # cascade plans are ignored: every request reads its whole KV


def prepare_attention(batch: ForwardBatch) -> None:
    """Per-step work before the first layer: none here."""


def paged_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's new tokens q [T, Hq, D] over their requests' KV.

    K/V of the new tokens must already be stored at `batch.out_slots`. Decode requests are
    attended together in one padded call; requests adding several tokens, one by one.
    Returns [T, Hq, D] (`out`, when given).
    """
    plan = _plan_for(batch)
    if plan.decode_slots is not None and not plan.extends:
        result = _decode_attention(q, k_pool_layer, v_pool_layer, plan, scale)
        return result if out is None else out.copy_(result)
    out = torch.empty_like(q) if out is None else out
    for span in plan.extends:
        k = k_pool_layer.index_select(0, span.kv_slots).unsqueeze(0).to(q.dtype)
        v = v_pool_layer.index_select(0, span.kv_slots).unsqueeze(0).to(q.dtype)
        q_span = q[span.q_start : span.q_end].unsqueeze(0)
        causal = span.causal_mask is None
        out[span.q_start : span.q_end] = _attend(q_span, k, v, span.causal_mask, scale, causal)[0]
    if plan.decode_rows is not None:
        decode_q = q.index_select(0, plan.decode_rows)
        decode_out = _decode_attention(decode_q, k_pool_layer, v_pool_layer, plan, scale)
        out.index_copy_(0, plan.decode_rows, decode_out)
    return out


def _decode_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    plan: _AttentionPlan,
    scale: float,
) -> torch.Tensor:
    """One query per request: the query heads sharing a KV head become that head's rows."""
    assert plan.decode_slots is not None
    batch_size, max_len = plan.decode_slots.shape
    num_kv_heads, head_dim = k_pool_layer.shape[1:]
    if plan.decode_run is not None:
        start, end = plan.decode_run
        k = k_pool_layer[start:end].unsqueeze(0)
        v = v_pool_layer[start:end].unsqueeze(0)
    else:
        flat_slots = plan.decode_slots.reshape(-1)
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        k = k_pool_layer.index_select(0, flat_slots).view(shape)
        v = v_pool_layer.index_select(0, flat_slots).view(shape)
    grouped_q = q.view(batch_size, num_kv_heads, -1, head_dim)
    k, v = k.to(q.dtype), v.to(q.dtype)  # an 8-bit pool's K/V in the compute dtype
    out = F.scaled_dot_product_attention(
        grouped_q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.decode_mask, scale=scale
    )
    return out.reshape(q.shape)
