"""Timing of one batch of requests: through the in-process Engine or the HF baseline.

Every function returns a `RunStats`: wall time, token counts and the per-token arrival
intervals it could observe. Token arrival times of the engine are taken in its loop thread,
when each token's delta is handed over, so the consumer's own speed does not show.
"""

from __future__ import annotations

import functools
import math
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from backend.hf.baseline import HFBaseline
from benchmarks.report import percentile
from benchmarks.workloads import BenchRequest
from engine.engine import Prompt
from engine.request import StreamDelta
from engine.sampling_params import SamplingParams
from multi_device import AnyEngine


class BenchError(RuntimeError):
    """A workload cannot run or a request failed; the message says why."""


@dataclass
class RunStats:
    """What one run of a batch of requests measured."""

    num_requests: int
    wall_s: float
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    itls_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0  # single stream: first token to last token
    decode_tokens: int = 0  # tokens generated after the first in that time

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else math.nan

    def ttft_ms(self, q: float) -> float:
        return percentile(self.ttfts_s, q) * 1000

    def itl_ms(self, q: float) -> float:
        return percentile(self.itls_s, q) * 1000

    def summary(self) -> dict[str, float]:
        """The figures that go into the results JSON."""
        return {
            "num_requests": self.num_requests,
            "wall_s": self.wall_s,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tok_s": self.output_tok_s,
            "decode_tok_s": self.decode_tok_s,
            **{f"ttft_p{q}_ms": self.ttft_ms(q) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": self.itl_ms(q) for q in (50, 90, 99)},
        }


@dataclass
class _Trace:
    """Arrival times of one request's tokens."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0

    def add(self, delta: StreamDelta, now: float) -> None:
        if delta.token_ids:
            self.token_times.append(now)
            self.output_tokens += len(delta.token_ids)
        if delta.usage is not None:
            self.cached_tokens = delta.usage.cached_tokens


def engine_run(
    engine: AnyEngine,
    prompts: Sequence[Prompt],
    params: Sequence[SamplingParams],
    desc: str,
) -> RunStats:
    """Submit every prompt at once and wait for all; a failed request raises BenchError."""
    ends: queue.SimpleQueue[tuple[int, StreamDelta]] = queue.SimpleQueue()
    traces: list[_Trace] = []
    input_tokens = 0
    start = time.perf_counter()
    for index, (prompt, sp) in enumerate(zip(prompts, params)):
        ids = engine.tokenize(prompt)
        input_tokens += len(ids)
        traces.append(_Trace(time.perf_counter()))
        engine.submit(ids, sp, functools.partial(_record, traces[index], ends, index))
    with tqdm(total=len(traces), desc=desc, unit="req", leave=False) as progress:
        pending = len(traces)
        while pending:
            index, delta = ends.get()
            if delta.error:
                raise BenchError(f"request {index} failed: {delta.error}")
            pending -= 1
            progress.update()
    wall = max(t.token_times[-1] for t in traces if t.token_times) - start
    return _stats_of(traces, wall, input_tokens)


def _record(trace: _Trace, ends: queue.SimpleQueue[tuple[int, StreamDelta]], index: int,
            delta: StreamDelta) -> None:
    """The sink, on the producer's thread: the delta's arrival goes into its request's trace
    there; only a request's end wakes the waiting thread (a consumer woken for every token
    would take the interpreter lock from the engine's loop thread at every step)."""
    trace.add(delta, time.perf_counter())
    if delta.finished or delta.error:
        ends.put((index, delta))


def _stats_of(traces: list[_Trace], wall_s: float, input_tokens: int) -> RunStats:
    stats = RunStats(
        num_requests=len(traces),
        wall_s=wall_s,
        input_tokens=input_tokens,
        output_tokens=sum(t.output_tokens for t in traces),
        cached_tokens=sum(t.cached_tokens for t in traces),
    )
    for trace in traces:
        if not trace.token_times:
            continue
        stats.ttfts_s.append(trace.token_times[0] - trace.submitted)
        stats.itls_s.extend(b - a for a, b in zip(trace.token_times, trace.token_times[1:]))
    if len(traces) == 1 and traces[0].token_times:
        stats.decode_s = traces[0].token_times[-1] - traces[0].token_times[0]
        stats.decode_tokens = traces[0].output_tokens - 1
    return stats


def engine_requests(engine: AnyEngine, requests: Sequence[BenchRequest], desc: str) -> RunStats:
    """`engine_run` of token-id requests, greedy, ignoring EOS (every output has its length)."""
    params = [greedy(r.max_new_tokens) for r in requests]
    return engine_run(engine, [r.prompt_ids for r in requests], params, desc)


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


def hf_single(
    baseline: HFBaseline, prompt_ids: list[int], max_new_tokens: int, desc: str
) -> RunStats:
    """Batch-1 greedy `generate` of exactly `max_new_tokens` tokens (EOS ignored).

    Timed twice: one new token (prefill, the time to first token) and all of them; decode
    speed is the tokens after the first over the difference. No streamer: its per-word
    chunks would blur token timings.
    """
    with tqdm(total=2, desc=desc, unit="run", leave=False) as progress:
        start = time.perf_counter()
        baseline.generate_batch([prompt_ids], 1, ignore_eos=True)
        prefill = time.perf_counter() - start
        progress.update()
        start = time.perf_counter()
        baseline.generate_batch([prompt_ids], max_new_tokens, ignore_eos=True)
        total = time.perf_counter() - start
        progress.update()
    return RunStats(
        num_requests=1,
        wall_s=total,
        input_tokens=len(prompt_ids),
        output_tokens=max_new_tokens,
        ttfts_s=[prefill],
        decode_s=max(total - prefill, 0.0),
        decode_tokens=max_new_tokens - 1,
    )


def hf_batches(
    baseline: HFBaseline, requests: Sequence[BenchRequest], batch_size: int, desc: str
) -> RunStats:
    """`generate` over left-padded batches of `batch_size` requests, in order.

    Each batch generates its longest output for every row; only the tokens each request
    asked for count as output.
    """
    start = time.perf_counter()
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        longest = max(r.max_new_tokens for r in batch)
        baseline.generate_batch([r.prompt_ids for r in batch], longest, ignore_eos=True)
    return RunStats(
        num_requests=len(requests),
        wall_s=time.perf_counter() - start,
        input_tokens=sum(r.input_len for r in requests),
        output_tokens=sum(r.max_new_tokens for r in requests),
    )
