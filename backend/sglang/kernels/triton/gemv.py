"""Small-batch linear layers (`y = x W^T + b` for at most GEMV_MAX_ROWS rows): a GEMV kernel.

At batch-1 decode every matmul reads a weight matrix once for one row of activations, so the
time is the weight bytes over memory bandwidth plus latency. cuBLAS's general kernels (and
the split-K reduction it adds for long rows) leave much of that bandwidth unused at these
sizes. Here program p owns BLOCK_N output columns: it streams their weight rows in BLOCK_K
chunks, unrolled so that all loads can be in flight at once, and applies them to each of
the M activation rows (the weights are read once for all rows), accumulating in float32.

Which one runs is measured, not guessed: `choose` times cuBLAS and a few kernel shapes for
each (rows, out, in, dtype) once, outside any CUDA graph capture, as the model's layers run
them (timing.py: in a CUDA graph, the weights streaming from memory), and remembers the
winner, so the kernel is only used where it is faster on this card.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from backend.sglang.kernels.torch_ops import linear as torch_linear
from backend.sglang.kernels.triton.timing import measured_choice

logger = logging.getLogger(__name__)

GEMV_MAX_ROWS = 2  # at 4 rows cuBLAS measured faster on an H100 for every decoder shape
GEMV_DTYPES = (torch.bfloat16, torch.float16)
_MIN_GAIN = 0.05  # the kernel must beat cuBLAS by this fraction to be chosen


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


# Few shapes: each is compiled (once per host, Triton caches it) and timed at start-up. On an
# H100 two-column blocks won for every Qwen3-0.6B shape at one row but gate_up, which took
# (8, 512, 4), and qkv once took (8, 1024, 8); (4, 1024, 4) and 16-column blocks never won.
CANDIDATES = (GemvConfig(2, 1024, 4), GemvConfig(8, 512, 4), GemvConfig(8, 1024, 8))
_CHOICE: dict[tuple[int, int, int, torch.dtype, torch.device], GemvConfig | None] = {}


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_K_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in tl.static_range(NUM_K_BLOCKS):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            x = tl.load(x_ptr + m * stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)
            part = tl.sum(w * x[None, :], axis=1)
            acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & n_mask[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: GemvConfig = GemvConfig(8, 1024, 4), out: torch.Tensor | None = None
         ) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [M <= GEMV_MAX_ROWS, K], weight [N, K] (rows
    contiguous); returns [M, N] in x's dtype (`out`, with contiguous rows, when given)."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {rows}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("gemv needs weight rows contiguous in the input dim")
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device) if out is None else out
    if y.stride(1) != 1:
        raise ValueError("gemv writes rows contiguous in the output dim")
    if rows == 0:
        return y
    block_k = min(config.block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, x.stride(0),
        weight.stride(0), y.stride(0),
        M=rows, HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(rows),
        BLOCK_N=config.block_n, BLOCK_K=block_k, NUM_K_BLOCKS=triton.cdiv(k, block_k),
        num_warps=config.num_warps,
    )
    return y


def choose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
           ) -> GemvConfig | None:
    """The kernel shape that beats cuBLAS for this call's sizes, or None (use cuBLAS).

    Measured once per (rows, out, in, dtype, device); while a CUDA graph is being captured
    nothing can be timed, so an unmeasured size takes cuBLAS there.
    """
    key = (x.shape[0], weight.shape[0], weight.shape[1], x.dtype, x.device)
    if key in _CHOICE:
        return _CHOICE[key]
    if torch.cuda.is_current_stream_capturing():
        return None
    runs: dict[GemvConfig | None, Callable[[torch.Tensor], object]] = {
        None: partial(F.linear, x, bias=bias)}
    runs.update({config: partial(gemv, x, bias=bias, config=config) for config in CANDIDATES})
    best = measured_choice(weight, runs, _MIN_GAIN, f"linear {key[:3]}, GEMV against cuBLAS",
                           logging.INFO)
    _CHOICE[key] = best
    return best


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`torch_ops.linear`, through the GEMV kernel where it measured faster (CUDA, half
    precision, at most GEMV_MAX_ROWS rows)."""
    if (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS
            and x.dtype in GEMV_DTYPES and weight.dtype == x.dtype and weight.stride(1) == 1
            and (out is None or out.stride(1) == 1)):
        config = choose(x, weight, bias)
        if config is not None:
            return gemv(x, weight, bias, config, out)
    return torch_linear(x, weight, bias, out)
