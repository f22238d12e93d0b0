"""Per-token kernels: rotary embedding, SwiGLU activation and the paged KV-cache store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.triton.common import emulate_fp8, to_pool

_SILU_BLOCK = 1024


@triton.jit
def _rotate_heads(
    x_ptr, stride_h, out_ptr, num_heads, half, cos, sin,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < half)
    first = x_ptr + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out_first = out_ptr + heads[:, None] * (2 * half) + offs[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_first, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(out_first + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cache_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    offs = tl.arange(0, BLOCK_HALF)
    cos_row = cache_ptr + position * stride_cache
    cos = tl.load(cos_row + offs, mask=offs < half, other=0.0).to(tl.float32)
    sin = tl.load(cos_row + half + offs, mask=offs < half, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, q_out_ptr + token * num_q_heads * 2 * half,
        num_q_heads, half, cos, sin, BLOCK_HQ, BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, k_out_ptr + token * num_k_heads * 2 * half,
        num_k_heads, half, cos, sin, BLOCK_HK, BLOCK_HALF,
    )


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding of q [T, Hq, D] and k [T, Hkv, D] (new contiguous tensors).

    `cos_sin_cache` is torch_ops.build_rope_cache's float32 [max_pos, D] table (cos | sin).
    """
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    cos_sin_cache = _unit_last_stride(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            num_q_heads, k.shape[1], head_dim // 2,
            BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < width
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + offs, mask=mask, other=0.0).to(tl.float32)
    activated = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * width + offs, activated.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `x = [gate | up]` on the last dim."""
    width = x.shape[-1] // 2
    rows = _unit_last_stride(x).reshape(-1, 2 * width)
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    if rows.shape[0] and width:
        block = min(_SILU_BLOCK, triton.next_power_of_2(width))
        grid = (rows.shape[0], triton.cdiv(width, block))
        _silu_and_mul_kernel[grid](rows, out, rows.stride(0), width, BLOCK=block)
    return out


@triton.jit
def _store_kv_kernel(
    k_pool_ptr, v_pool_ptr, slots_ptr, k_ptr, v_ptr,
    stride_kp_slot, stride_kp_head, stride_vp_slot, stride_vp_head,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (offs < head_dim)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + offs, mask=mask)
    k_dst = k_pool_ptr + slot * stride_kp_slot + heads * stride_kp_head + offs
    v_dst = v_pool_ptr + slot * stride_vp_slot + heads * stride_vp_head + offs
    tl.store(k_dst, to_pool(k, k_pool_ptr, EMULATE_FP8), mask=mask)
    tl.store(v_dst, to_pool(v, v_pool_ptr, EMULATE_FP8), mask=mask)


def store_kv(
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write k, v [T, Hkv, D] into rows `slots` [T] of one layer's pools (KVPool.store)."""
    k, v = _unit_last_stride(k), _unit_last_stride(v)
    num_tokens, num_heads, head_dim = k.shape
    if k_pool_layer.shape[1:] != (num_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit pool rows "
            f"{tuple(k_pool_layer.shape[1:])}"
        )
    if k_pool_layer.stride(-1) != 1 or v_pool_layer.stride(-1) != 1:
        raise ValueError("KV pool rows must be contiguous in head_dim")
    if num_tokens:
        _store_kv_kernel[(num_tokens,)](
            k_pool_layer, v_pool_layer, slots, k, v,
            k_pool_layer.stride(0), k_pool_layer.stride(1),
            v_pool_layer.stride(0), v_pool_layer.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            num_heads, head_dim,
            BLOCK_H=triton.next_power_of_2(num_heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            EMULATE_FP8=emulate_fp8(k_pool_layer),
        )


@triton.jit
def _norm_rotate_heads(
    src, num_heads, half, cos, sin, norm_ptr, eps, HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Heads [BLOCK_H, D] of one token at `src` (rows of 2 * half): RMS-normed (rounded to
    the input dtype between steps, as separate norm and rotary kernels would) and rotated;
    returns the two halves in float32."""
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < half)
    first = src + heads[:, None] * (2 * half) + offs[None, :]
    dtype = src.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        w1 = tl.load(norm_ptr + offs, mask=offs < half, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + half + offs, mask=offs < half, other=0.0).to(tl.float32)
        x1 = (x1 * inv[:, None]).to(dtype).to(tl.float32) * w1[None, :]
        x2 = (x2 * inv[:, None]).to(dtype).to(tl.float32) * w2[None, :]
        x1 = x1.to(dtype).to(tl.float32)
        x2 = x2.to(dtype).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :], mask


@triton.jit
def _qkv_prepare_kernel(
    qkv_ptr, positions_ptr, cache_ptr, slots_ptr, q_norm_ptr, k_norm_ptr,
    q_out_ptr, k_pool_ptr, v_pool_ptr,
    stride_t, stride_cache, stride_kp, stride_vp,
    num_q_heads, num_kv_heads, half, eps,
    HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, EMULATE_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos_row = cache_ptr + position * stride_cache
    cos = tl.load(cos_row + offs, mask=offs < half, other=0.0).to(tl.float32)
    sin = tl.load(cos_row + half + offs, mask=offs < half, other=0.0).to(tl.float32)
    row = qkv_ptr + token * stride_t
    head_dim = 2 * half
    q1, q2, q_mask = _norm_rotate_heads(row, num_q_heads, half, cos, sin, q_norm_ptr, eps,
                                        HAS_NORM, BLOCK_HQ, BLOCK_HALF)
    q_heads = tl.arange(0, BLOCK_HQ)[:, None]
    q_dst = q_out_ptr + token * num_q_heads * head_dim + q_heads * head_dim + offs[None, :]
    q_dtype = q_out_ptr.dtype.element_ty
    tl.store(q_dst, q1.to(q_dtype), mask=q_mask)
    tl.store(q_dst + half, q2.to(q_dtype), mask=q_mask)
    k_src = row + num_q_heads * head_dim
    k1, k2, k_mask = _norm_rotate_heads(k_src, num_kv_heads, half, cos, sin, k_norm_ptr, eps,
                                        HAS_NORM, BLOCK_HK, BLOCK_HALF)
    kv_heads = tl.arange(0, BLOCK_HK)[:, None]
    k_dst = k_pool_ptr + slot * stride_kp + kv_heads * head_dim + offs[None, :]
    # K rounds to the model dtype first, as the torch path's K does before its pool cast
    tl.store(k_dst, to_pool(k1.to(q_dtype), k_pool_ptr, EMULATE_FP8), mask=k_mask)
    tl.store(k_dst + half, to_pool(k2.to(q_dtype), k_pool_ptr, EMULATE_FP8), mask=k_mask)
    v_src = k_src + num_kv_heads * head_dim + kv_heads * head_dim + offs[None, :]
    v_dst = v_pool_ptr + slot * stride_vp + kv_heads * head_dim + offs[None, :]
    v1 = tl.load(v_src, mask=k_mask)
    v2 = tl.load(v_src + half, mask=k_mask)
    tl.store(v_dst, to_pool(v1, v_pool_ptr, EMULATE_FP8), mask=k_mask)
    tl.store(v_dst + half, to_pool(v2, v_pool_ptr, EMULATE_FP8), mask=k_mask)


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
    """torch_ops.qkv_prepare in one kernel: q/k norms, rotary, and the K/V store (q into
    `out`, contiguous [T, Hq, D], when given)."""
    qkv = _unit_last_stride(qkv)
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_q_heads + 2 * num_kv_heads)
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q and k norms come together")
    pool_row = (num_kv_heads, head_dim)
    if k_pool_layer.shape[1:] != pool_row or v_pool_layer.shape != k_pool_layer.shape:
        raise ValueError(f"KV pools {tuple(k_pool_layer.shape)} do not hold rows {pool_row}")
    if not (k_pool_layer.is_contiguous() and v_pool_layer.is_contiguous()):
        raise ValueError("KV pools must be contiguous")
    cos_sin_cache = _unit_last_stride(cos_sin_cache)
    shape = (num_tokens, num_q_heads, head_dim)
    if out is not None and (tuple(out.shape) != shape or out.dtype != qkv.dtype
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {qkv.dtype} tensor of shape {shape}")
    q_out = torch.empty(shape, dtype=qkv.dtype, device=qkv.device) if out is None else out
    if num_tokens:
        has_norm = q_norm is not None
        _qkv_prepare_kernel[(num_tokens,)](
            qkv, positions, cos_sin_cache, slots,
            q_norm if has_norm else qkv, k_norm if has_norm else qkv,
            q_out, k_pool_layer, v_pool_layer,
            qkv.stride(0), cos_sin_cache.stride(0), k_pool_layer.stride(0),
            v_pool_layer.stride(0),
            num_q_heads, num_kv_heads, head_dim // 2, eps,
            HAS_NORM=has_norm,
            BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            EMULATE_FP8=emulate_fp8(k_pool_layer),
        )
    return q_out
