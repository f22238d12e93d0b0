"""The triton kernel set: the torch_ops interface with Triton kernels (CUDA; any device under
TRITON_INTERPRET=1). Matmuls stay in torch; the rotary table is torch_ops' own.

Supported shapes: any head_dim up to 256 (non-powers of two are masked; rotary needs it even),
any number of query heads that is a multiple of the KV heads, KV pools of one dtype equal to
q's. Every op returns new tensors and leaves its inputs untouched, as torch_ops does.
"""

from __future__ import annotations

import torch

from backend.batch import ForwardBatch
from backend.kv_pool import KV_FP8
from backend.sglang.kernels.torch_ops import build_rope_cache
from backend.sglang.kernels.triton.cascade_attention import (
    cascade_decode_attention,
    choose_prefix_splits,
    measure_shared_prefixes,
)
from backend.sglang.kernels.triton.common import has_long_block_smem
from backend.sglang.kernels.triton.decode_attention import (
    ROW_ORDER_MIN_ROWS,
    choose_long_block_splits,
    choose_num_splits,
    decode_attention,
    longest_first,
)
from backend.sglang.kernels.triton.elementwise import (
    apply_rotary,
    qkv_prepare,
    silu_and_mul,
    store_kv,
)
from backend.sglang.kernels.triton.extend_attention import extend_attention
from backend.sglang.kernels.triton.gemv import linear
from backend.sglang.kernels.triton.norm import fused_add_rms_norm, rms_norm
from backend.sglang.kernels.triton.split_k import linear_into_norm

__all__ = [
    "apply_rotary",
    "build_rope_cache",
    "fused_add_rms_norm",
    "linear",
    "linear_into_norm",
    "paged_attention",
    "prepare_attention",
    "qkv_prepare",
    "rms_norm",
    "silu_and_mul",
    "store_kv",
]

MAX_HEAD_DIM = 256
CASCADE_ATTENTION = True  # cascade plans of one-token requests are used (backend/cascade.py)
ROW_ORDER = "row_order"  # ForwardBatch.attention_state: a decode batch's launch order


def _check_shapes(
    q: torch.Tensor, k_pool_layer: torch.Tensor, v_pool_layer: torch.Tensor, num_kv_heads: int
) -> None:
    num_q_heads, head_dim = q.shape[1:]
    pool_row = (num_kv_heads, head_dim)
    if k_pool_layer.shape[1:] != pool_row or v_pool_layer.shape != k_pool_layer.shape:
        raise ValueError(
            f"KV pools {tuple(k_pool_layer.shape)} do not hold {num_kv_heads} heads of {head_dim}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} exceeds the supported {MAX_HEAD_DIM}")
    if v_pool_layer.dtype != k_pool_layer.dtype or k_pool_layer.dtype not in (q.dtype,
                                                                              KV_FP8):
        raise ValueError(f"KV pool dtype {k_pool_layer.dtype} is neither q's {q.dtype} "
                         f"nor {KV_FP8}")
    if k_pool_layer.stride(-1) != 1 or v_pool_layer.stride(-1) != 1:
        raise ValueError("KV pool rows must be contiguous in head_dim")


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

    K/V of the new tokens must already be stored at `batch.out_slots`. All-decode batches use
    the split-K decode kernel (with their cascade plan, if any); anything else (prefill,
    extend, mixed) the extend kernel, except that a mixed batch's one-token requests
    (`batch.single_rows`) go through the decode kernel too (with the plan, if any).
    Grid sizes come from the batch's host lists; nothing here waits on the device.
    Returns [T, Hq, D] (`out`, contiguous, when given: the extend kernel writes into it).
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    _check_shapes(q, k_pool_layer, v_pool_layer, num_kv_heads)
    if batch.batch_size == 0:
        return torch.empty_like(q) if out is None else out
    if batch.is_decode:
        result = _one_token_attention(q, k_pool_layer, v_pool_layer, batch, scale, num_kv_heads)
        return result if out is None else out.copy_(result)
    singles = batch.single_rows
    longest_run, prefix_heavy = batch.extend_shape
    out = extend_attention(
        q, k_pool_layer, v_pool_layer, batch.qo_indptr, batch.kv_indptr, batch.kv_indices,
        scale, max(longest_run, 1), prefix_heavy, block_n=_block_n(q),
        skip_single=singles is not None, out=out,
    )
    if singles is not None:  # a mixed batch's decodes: split-K, each KV head read once
        req_ids, token_rows = singles[0], singles[1]
        decoded = _one_token_attention(q.index_select(0, token_rows), k_pool_layer,
                                       v_pool_layer, batch, scale, num_kv_heads, req_ids)
        out.index_copy_(0, token_rows, decoded)
    return out


def _block_n(q: torch.Tensor) -> int:
    return 64 if q.shape[-1] <= 128 else 32


def _one_token_attention(
    q: torch.Tensor,
    k_pool_layer: torch.Tensor,
    v_pool_layer: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    num_kv_heads: int,
    req_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The split-K decode kernel for requests adding one token: every row of a decode batch,
    or (with `req_ids`, row r being request req_ids[r]) a mixed batch's `single_rows`; with
    the batch's cascade plan when it has one."""
    rows = q.shape[0]
    block_n = _block_n(q)
    long_blocks = q.shape[-1] <= 128 and has_long_block_smem(q.device)
    kv = (k_pool_layer, v_pool_layer, batch.kv_indptr, batch.kv_indices)
    if batch.cascade is not None:
        num_splits = choose_num_splits(rows, num_kv_heads, batch.max_single_seq_len, q.device)
        # not for a mixed step's rows (req_ids): cascade needs a long shared prefix, so no
        # warm-up request reaches that variant with one slice, and it would compile in
        # traffic; a decode step's variant compiles while its graph bucket is captured
        whole_suffix = num_splits == 1 and long_blocks and req_ids is None
        return cascade_decode_attention(
            q, *kv, batch.cascade, scale, num_splits,
            choose_prefix_splits(rows, q.shape[1], num_kv_heads, q.device),
            block_n=2 * block_n if whole_suffix else block_n,
            prefix_block_n=2 * block_n if long_blocks else block_n,
            req_ids=req_ids, suffix_stages=2 if whole_suffix else None,
        )
    # a decode batch's rows, longest first (`prepare_attention`)
    row_order = batch.attention_state.get(ROW_ORDER) if req_ids is None else None
    if long_blocks:  # twice the keys per step, in fewer programs (H100: BENCHMARKS.md)
        num_splits = choose_long_block_splits(rows, num_kv_heads, batch.max_single_seq_len,
                                              q.device)
        return decode_attention(q, *kv, scale, num_splits, block_n=2 * block_n, num_stages=2,
                                req_ids=req_ids, row_order=row_order)
    num_splits = choose_num_splits(rows, num_kv_heads, batch.max_single_seq_len, q.device)
    return decode_attention(q, *kv, scale, num_splits, block_n=block_n, req_ids=req_ids,
                            row_order=row_order)


def prepare_attention(batch: ForwardBatch) -> None:
    """Per-step work before the first layer: a decode batch's launch order (longest request
    first), or the measure of a cascade plan's shared prefixes."""
    if batch.cascade is None:
        if batch.batch_size >= ROW_ORDER_MIN_ROWS and batch.is_decode:
            batch.attention_state[ROW_ORDER] = longest_first(batch.kv_indptr)
        return
    if not batch.batch_size:
        return
    if batch.is_decode:
        measure_shared_prefixes(batch.kv_indptr, batch.kv_indices, batch.cascade)
    elif batch.single_rows is not None:
        measure_shared_prefixes(batch.kv_indptr, batch.kv_indices, batch.cascade,
                                req_ids=batch.single_rows[0])
