"""Pieces shared by the attention kernels."""

from __future__ import annotations

import functools
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


def emulate_fp8(pool: torch.Tensor) -> bool:
    """Whether stores into `pool` must round to float8 e4m3 themselves: Triton's CPU
    interpreter converts to float8 wrongly (a rounding that carries into the exponent loses
    it), so there kernels round first and the conversion that follows is exact."""
    return upcast_dots() and pool.dtype == torch.float8_e4m3fn


@triton.jit
def to_pool(x, pool_ptr, EMULATE_FP8: tl.constexpr):
    """`x` in the element type of `pool_ptr` (a KV pool: the model dtype or float8 e4m3,
    saturating at ±448 like the torch stores). Into float8 through float32, which holds any
    model dtype exactly: one rounding, by the conversion Triton has (compute capability 8.9
    and later; backend.factory refuses the 8-bit pool on older cards)."""
    if pool_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        if EMULATE_FP8:
            x = _round_to_e4m3(x)
    return x.to(pool_ptr.dtype.element_ty)


@triton.jit
def _round_to_e4m3(x):
    """x (float32, within ±448) rounded to the nearest float8 e4m3 value, ties to even."""
    magnitude = tl.abs(x)
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(magnitude, 1e-30))), -6.0)
    step = tl.exp2(exponent - 3.0)  # three mantissa bits; subnormals below 2^-6
    scaled = magnitude / step
    whole = tl.floor(scaled)
    frac = scaled - whole
    up = (frac > 0.5) | ((frac == 0.5) & (whole % 2 == 1))
    rounded = tl.where(up, whole + 1.0, whole) * step
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`a @ b` accumulated in float32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def attend_keys(
    q, m_i, l_i, acc, k_pool_ptr, v_pool_ptr, slot_ptr, lo, hi, kv_head, last_visible,
    stride_k_slot, stride_k_head, stride_v_slot, stride_v_head, scale_log2, d, d_mask,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) for the query tile q with the keys whose
    slots are slot_ptr[lo:hi], one block of BLOCK_N at a time (log2 domain: `scale_log2`
    includes log2(e)). MASKED masks keys past `hi` (without it, hi - lo must be a multiple
    of BLOCK_N); CAUSAL (with MASKED) also lets row r see key n only if n <= last_visible[r]
    (otherwise `last_visible` is not read)."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        if MASKED:
            n_mask = n < hi
            slots = tl.load(slot_ptr + n, mask=n_mask, other=0)
            k_mask = n_mask[None, :] & d_mask[:, None]
            v_mask = n_mask[:, None] & d_mask[None, :]
        else:
            slots = tl.load(slot_ptr + n)
            k_mask = d_mask[:, None]
            v_mask = d_mask[None, :]
        k_ptrs = k_pool_ptr + slots[None, :] * stride_k_slot + kv_head * stride_k_head + d[:, None]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0).to(q.dtype)
        scores = mma(q, k, DOT_PRECISION, UPCAST) * scale_log2
        if CAUSAL:
            visible = n_mask[None, :] & (n[None, :] <= last_visible[:, None])
            scores = tl.where(visible, scores, float("-inf"))
        elif MASKED:
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_pool_ptr + slots[:, None] * stride_v_slot + kv_head * stride_v_head + d[None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def attend_slots(
    q, k_pool_ptr, v_pool_ptr, slot_ptr, lo, hi, kv_head,
    stride_k_slot, stride_k_head, stride_v_slot, stride_v_head, scale_log2, d, d_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online-softmax attention of the query tile q [BLOCK_M, BLOCK_D] over the keys whose
    slots are slot_ptr[lo:hi] (`attend_keys`). Returns the float32 output tile and each
    row's log2-sum-exp (-inf, with a zero output, for a row that saw no key)."""
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = attend_keys(
        q, m_i, l_i, acc, k_pool_ptr, v_pool_ptr, slot_ptr, lo, hi, kv_head, lo,
        stride_k_slot, stride_k_head, stride_v_slot, stride_v_head, scale_log2, d, d_mask,
        BLOCK_N, True, False, DOT_PRECISION, UPCAST,
    )
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def request_of(row, req_ids_ptr, HAS_REQ_IDS: tl.constexpr):
    """The `kv_indptr` request of kernel row `row`: req_ids[row] when the rows are a subset
    of the batch (a mixed batch's one-token requests), else the row itself."""
    if HAS_REQ_IDS:
        request = tl.load(req_ids_ptr + row)
    else:
        request = row.to(tl.int64)
    return request


LONG_BLOCK_SMEM = 160 * 1024  # two stages of 128-key K and V tiles (head_dim 128, 16 bits)


@functools.lru_cache(maxsize=8)
def has_long_block_smem(device: torch.device) -> bool:
    """Whether the device's shared memory holds the long-key-block attention launches
    (A100/H100 class; the CPU interpreter has no limit)."""
    if device.type != "cuda":
        return True
    props = torch.cuda.get_device_properties(device)
    return int(props.shared_memory_per_multiprocessor) >= LONG_BLOCK_SMEM
