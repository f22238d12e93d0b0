"""Split-K linear layers whose output only feeds a residual add: `o_proj` and `down_proj`.

Both project a wide input (2-3k) onto the narrow hidden size (1k for Qwen3-0.6B). cuBLAS
covers so few output columns with so few tiles that at decode batches most multiprocessors
sit idle and the weights stream at about a third of the card's bandwidth. Here the input
dim is cut into `splits` slices as well: program (column block, slice, row block) multiplies
its slice of x by its slice of W and writes a float32 partial sum. Nothing adds the partials
up in a kernel of its own: the fused residual-add + RMSNorm that always follows reads them
(`SplitSum`, see norm.py), so the layer costs one launch, as before.

Which one runs is measured, not guessed (as for the GEMV, which keeps one and two rows):
`choose` times cuBLAS and a few launch shapes per row bucket the first time a weight shape
comes (start-up, outside any CUDA graph capture), the partials' extra reading by the norm
included, and remembers the winner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import triton
import triton.language as tl

from backend.sglang.kernels.torch_ops import SplitSum
from backend.sglang.kernels.triton.common import dot_precision, mma, upcast_dots
from backend.sglang.kernels.triton.gemv import GEMV_MAX_ROWS
from backend.sglang.kernels.triton.gemv import linear as gemv_linear
from backend.sglang.kernels.triton.timing import measured_choice

logger = logging.getLogger(__name__)

# from SPLIT_K_MIN_ROWS rows (fewer are the GEMV's) up to SPLIT_K_MAX_ROWS (beyond, cuBLAS has
# enough tiles: H100, 1.1x at 128 rows, 1.0x at 256)
SPLIT_K_MIN_ROWS = GEMV_MAX_ROWS + 1
SPLIT_K_MAX_ROWS = 64
SPLIT_K_DTYPES = (torch.bfloat16, torch.float16)
_MIN_GAIN = 0.1  # the kernel must beat the plain linear by this fraction to be chosen


@dataclass(frozen=True)
class SplitConfig:
    block_m: int
    block_n: int
    block_k: int
    splits: int
    num_warps: int


# launch shapes measured best on an H100 for Qwen3-0.6B's o_proj and down_proj (with the norm
# after them, 1.25-1.5x cuBLAS + norm): for 1-16 rows and for 32-64 rows
CANDIDATES = (SplitConfig(16, 32, 128, 4, 4), SplitConfig(64, 32, 128, 4, 4))
ROW_BUCKETS = (4, 8, 16, 32, 64)  # a choice holds from the bucket before it up to its own
_CHOICE: dict[tuple[int, int, int, torch.dtype, torch.device], SplitConfig | None] = {}


@triton.jit
def _split_k_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
    K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K_PER_SPLIT, BLOCK_K):
        k = split * K_PER_SPLIT + start + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + n[None, :] * stride_wn + k[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        acc += mma(x, w, DOT_PRECISION, UPCAST_DOTS)
    o_ptrs = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(o_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, config: SplitConfig) -> SplitSum:
    """`x W^T` as float32 partial sums over `config.splits` slices of the input dim."""
    rows, k = x.shape
    n = weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("split_k_linear needs weight rows contiguous in the input dim")
    k_per_split = triton.cdiv(triton.cdiv(k, config.splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)
    partials = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
    if rows:
        grid = (triton.cdiv(n, config.block_n), splits, triton.cdiv(rows, config.block_m))
        _split_k_kernel[grid](
            x, weight, partials, rows, n, k, x.stride(0), weight.stride(0),
            partials.stride(0), partials.stride(1),
            K_PER_SPLIT=k_per_split, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, DOT_PRECISION=dot_precision(x.dtype),
            UPCAST_DOTS=upcast_dots(), num_warps=config.num_warps,
        )
    return SplitSum(partials, x.dtype)


def choose(x: torch.Tensor, weight: torch.Tensor) -> SplitConfig | None:
    """The launch shape that beats the plain linear for x's row bucket (the next of
    ROW_BUCKETS), or None (use the plain one). The first call for a weight shape measures
    every bucket (CUDA-graph replays over streamed weight copies, timing.py); while
    a CUDA graph is being captured nothing can be timed, so an unmeasured shape takes the
    plain linear there."""
    def key(rows: int) -> tuple[int, int, int, torch.dtype, torch.device]:
        return rows, weight.shape[0], weight.shape[1], x.dtype, x.device

    bucket = next(b for b in ROW_BUCKETS if b >= x.shape[0])
    if key(bucket) in _CHOICE:
        return _CHOICE[key(bucket)]
    if torch.cuda.is_current_stream_capturing():
        return None
    started = time.perf_counter()
    for rows in ROW_BUCKETS:
        _CHOICE[key(rows)] = _measure(rows, weight)
    logger.info("split-K linear %s: chosen at rows %s (%.1f s)", tuple(weight.shape),
                [rows for rows in ROW_BUCKETS if _CHOICE[key(rows)] is not None],
                time.perf_counter() - started)
    return _CHOICE[key(bucket)]


def _measure(rows: int, weight: torch.Tensor) -> SplitConfig | None:
    """The fastest of the plain linear (cuBLAS) and CANDIDATES at `rows` rows, each
    followed by the residual add + RMSNorm that reads its output (timed as timing.py
    says)."""
    from backend.sglang.kernels.triton.norm import fused_add_rms_norm

    x = torch.randn((rows, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    residual = torch.randn((rows, weight.shape[0]), dtype=weight.dtype, device=weight.device)
    norm_weight = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)

    def run(config: SplitConfig | None, w: torch.Tensor) -> None:
        y = gemv_linear(x, w, None) if config is None else split_k_linear(x, w, config)
        fused_add_rms_norm(y, residual, norm_weight, 1e-6)

    configs = (None, *_launchable(CANDIDATES, lambda c: run(c, weight)))
    return measured_choice(weight, {c: partial(run, c) for c in configs}, _MIN_GAIN,
                           f"split-K linear {rows} x {tuple(weight.shape)}")


def _launchable(configs: tuple[SplitConfig, ...], run: Callable[[SplitConfig], None]
                ) -> list[SplitConfig]:
    """The configs whose kernel compiles and runs on this card (a smaller one may lack the
    shared memory for a tile shape); each is run once, eagerly, before any timing graph."""
    usable = []
    for config in configs:
        try:
            run(config)
        except Exception as exc:  # noqa: BLE001 - Triton's resource errors vary by version
            logger.info("split-K %s does not run here (%s): skipped", config,
                        type(exc).__name__)
            continue
        usable.append(config)
    return usable


def linear_into_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> torch.Tensor | SplitSum:
    """`x W^T + b` for a result that only a fused residual-add + RMSNorm reads: split-K
    partials where that measured faster (CUDA, half precision, no bias, from
    SPLIT_K_MIN_ROWS to SPLIT_K_MAX_ROWS rows), else the plain linear (cuBLAS or the
    GEMV)."""
    if (bias is None and x.is_cuda and x.dim() == 2
            and SPLIT_K_MIN_ROWS <= x.shape[0] <= SPLIT_K_MAX_ROWS
            and x.dtype in SPLIT_K_DTYPES and weight.dtype == x.dtype
            and weight.stride(1) == 1):
        config = choose(x, weight)
        if config is not None:
            return split_k_linear(x, weight, config)
    return gemv_linear(x, weight, bias)
