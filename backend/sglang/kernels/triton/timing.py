"""Start-up timing of the small-batch matmul kernels, under the conditions of a model's layers.

The GEMV and split-K modules choose a kernel per weight shape by timing the candidates
once. Two things would mislead a plain timing. An eager timing of a Triton kernel measures
its Python launch (tens of µs) rather than its run (a few µs). And one weight matrix timed
alone stays in the card's L2 (50 MiB on an H100) after the first call. In the model it never
does: a layer streams ~30 MB of weights from memory and 28 layers run before the matrix
comes round again. So each candidate is timed inside a CUDA graph, cycling through copies
of its weight (up to STREAM_BYTES of them) so that they stream from memory, and the best of
two timings is kept. The graph is captured on a stream of the weight's own device, so
engines on several GPUs in one process each time on their own card.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

STREAM_BYTES = 128 << 20  # the weight copies of one timing: more than the L2 of any card here
MAX_COPIES = 256  # SmolLM2-135M's smallest matmul (576 x 576) takes 203
_REP_MS = 2.0  # graph replay time per timing
_REPLAYS = 10
_K = TypeVar("_K")


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """`weight` and enough clones of it that cycling through them reads STREAM_BYTES (none
    for a weight that large already; at most MAX_COPIES in all)."""
    count = min(MAX_COPIES, -(-STREAM_BYTES // max(1, weight.nbytes)))
    return [weight, *(weight.clone() for _ in range(count - 1))]


def graph_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Mean milliseconds per `fn()`, replayed in a CUDA graph captured on a stream of
    `device` (torch's shared capture stream lives on whichever GPU made it first)."""
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        fn()  # compiles and loads every kernel before the capture
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        repeats = max(1, int(_REP_MS / max(start.elapsed_time(end), 1e-3)))
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()  # a collection inside the capture could free a captured tensor
        try:
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(repeats):
                    fn()
        finally:
            if collecting:
                gc.enable()
        total = 0.0
        for _ in range(_REPLAYS):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            total += start.elapsed_time(end)
    return total / (_REPLAYS * repeats)


def streamed_ms(run: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Milliseconds per call of `run(w)`, replayed in a CUDA graph over `weights` in turn;
    the best of two timings."""
    def sweep() -> None:
        for weight in weights:
            run(weight)

    return min(graph_ms(sweep, weights[0].device) for _ in range(2)) / len(weights)


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


def fastest(timings: Mapping[_K | None, float], min_gain: float) -> _K | None:
    """The fastest entry of `timings`, unless it beats None (the plain call: cuBLAS, or the
    GEMV where that won) by less than `min_gain` of None's time: a near tie keeps None, so
    choices do not flip run to run."""
    best = min(timings, key=lambda c: timings[c])
    if best is not None and timings[best] > (1 - min_gain) * timings[None]:
        return None
    return best


def measured_choice(weight: torch.Tensor,
                    runs: Mapping[_K | None, Callable[[torch.Tensor], object]],
                    min_gain: float, label: str, level: int = logging.DEBUG) -> _K | None:
    """The start-up choice among `runs` (None: the plain call): `fastest` of their
    `streamed_timings`, logged at `level`. A timing that fails costs speed, never the
    start-up: it leaves the plain call."""
    try:
        timings = streamed_timings(weight, runs)
    except RuntimeError as exc:
        logger.warning("%s: timing failed (%s); the plain call", label, exc)
        return None
    best = fastest(timings, min_gain)
    logger.log(level, "%s: %s (%.2f us; plain %.2f us)", label, best or "plain",
               timings[best] * 1000, timings[None] * 1000)
    return best
