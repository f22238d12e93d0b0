"""Start-up timing of the small-batch matmul kernels, under the conditions of a model's layers.

The GEMV and split-K modules choose a kernel per weight shape by timing the candidates
once. Two things would mislead a plain timing. An eager timing of a Triton kernel measures
its Python launch (tens of µs) rather than its run (a few µs). And one weight matrix timed
alone stays in the card's L2 (50 MiB on an H100) after the first call. In the model it never
does: a layer streams ~30 MB of weights from memory and 28 layers run before the matrix
comes round again. So each candidate is timed inside a CUDA graph, cycling through enough
copies of its weight that they stream from memory, and the best of two timings is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
import triton

STREAM_BYTES = 128 << 20  # the weight copies of one timing: more than the L2 of any card here
MAX_COPIES = 64
_REP_MS = 2  # graph replay time per timing
_K = TypeVar("_K")


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and enough clones of it that cycling through them reads STREAM_BYTES (none
    for a weight that large already)."""
    count = min(MAX_COPIES, -(-STREAM_BYTES // max(1, weight.nbytes)))
    return [weight, *(weight.clone() for _ in range(count - 1))]


def streamed_ms(run: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Milliseconds per call of `run(w)`, replayed in a CUDA graph over `weights` in turn;
    the best of two timings."""
    def sweep() -> None:
        for weight in weights:
            run(weight)

    return min(float(triton.testing.do_bench_cudagraph(sweep, rep=_REP_MS))
               for _ in range(2)) / len(weights)


def streamed_timings(weight: torch.Tensor, runs: Mapping[_K, Callable[[torch.Tensor], object]]
                     ) -> dict[_K, float]:
    """`streamed_ms` of each run over copies of `weight`; the copies' memory goes back to
    the device afterwards (the KV pool is sized already: this is the headroom's)."""
    copies = weight_copies(weight)
    try:
        return {key: streamed_ms(run, copies) for key, run in runs.items()}
    finally:
        del copies
        torch.cuda.empty_cache()
