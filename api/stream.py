"""One HTTP request's generation: its engine requests, their merged deltas, abort and timeout.

`DeltaStream` is what every generation response reads: deltas from a producer's thread,
the deadline, disconnect checks, usage and metrics. A `GenerationStream` submits one engine
request per prompt (each with n sequences) and yields their deltas in arrival order, tagged
with the response's choice index (`prompt_index * n + delta.index`). It owns the abort:
`close()` aborts every engine request still running and is called when the response ends
for any reason (finished, client gone, timeout, error). It also records the request's
latencies in the server's metrics. A `VLMStream` does the same for one job of the
vision-language service, an `HFStream` for one generation of the transformers baseline
(`/generate` with `mode: "hf"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import APIError, ClientDisconnected
from api.metrics import ServerMetrics
from api.protocol import UsageInfo
from backend.vlm.runner import VLMPrompt
from backend.vlm.service import VLMBusy, VLMJob, VLMService
from engine.engine import Prompt
from engine.mailbox import loop_mailbox
from engine.request import StreamDelta, TokenLogprob, Usage
from engine.sampling_params import SamplingParams
from multi_device import EnginePool, EngineSlot, PoolBusy, PoolDown

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5

ParamsFor = Callable[[list[int]], SamplingParams]
IsDisconnected = Callable[[], Awaitable[bool]]
T = TypeVar("T")


class DeadlinePassed(Exception):
    """`wait_polling`'s deadline came before the awaited work was done."""


async def wait_polling(waited: asyncio.Future[Any], deadline: float | None,
                       is_disconnected: IsDisconnected | None) -> None:
    """Wait until `waited` is done, checking every DISCONNECT_POLL_S whether the client has
    gone (ClientDisconnected) and whether `deadline` (time.monotonic; None: none) has passed
    (DeadlinePassed). Cancels nothing: what giving up means is the caller's."""
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlinePassed
        limit = math.inf if deadline is None else deadline
        done, _ = await asyncio.wait({waited}, timeout=min(DISCONNECT_POLL_S, limit - now))
        if done:
            return
        if is_disconnected is not None and await is_disconnected():
            raise ClientDisconnected


@dataclass
class ChoiceResult:
    """Everything one output sequence produced (non-streaming answers)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Sequence:
    """Bookkeeping of one output sequence: its prompt, last token time, final usage."""

    prompt: int
    last_token_at: float | None = None
    usage: Usage | None = None


class DeltaStream:
    """The sequences behind one HTTP response, as one stream of (choice, delta): deltas
    arrive from a producer's thread through `_sink`; subclasses submit the work and say how
    to abort it (`_abort_running`)."""

    def __init__(self, metrics: ServerMetrics, timeout_s: float, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._deadline = arrival + timeout_s if timeout_s > 0 else None
        self._queue: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._mailbox = loop_mailbox(self._loop)
        self._lock = threading.Lock()
        self._rids: list[str] = []
        self._base: dict[str, int] = {}
        self._sequences: dict[int, _Sequence] = {}
        self._remaining = 0
        self._closed = False
        self._first_token_seen = False
        self._next_poll = arrival + DISCONNECT_POLL_S
        self.adjusted_max_tokens: int | None = None  # ADAPTIVE_MAX_NEW_TOKENS took effect
        metrics.in_flight += 1

    def _sink(self, delta: StreamDelta) -> None:
        """Called on the producer's thread (an engine's, the vision-language worker's)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self._mailbox.post(self._queue.put_nowait, delta)

    # -------------------------------------------------------------- deltas
    async def deltas(
        self, is_disconnected: IsDisconnected | None = None
    ) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(choice index, delta) until every sequence finished; raises APIError on failure."""
        while self._remaining:
            delta = await self._next(is_disconnected)
            if delta.error is not None:
                self._fail("engine_error")
                code = "engine_unavailable" if delta.error_status == 503 else None
                raise APIError(delta.error_status, delta.error, type="server_error", code=code)
            index = self._base[delta.rid] + delta.index
            self._observe(index, delta)
            if delta.finished:
                self._remaining -= 1
                if not self._remaining:
                    self._complete(delta.finish_reason or "stop")
            yield index, delta

    async def collect(self, is_disconnected: IsDisconnected | None = None) -> list[ChoiceResult]:
        """Every sequence's whole output, in choice order."""
        results: dict[int, ChoiceResult] = {}
        try:
            async for index, delta in self.deltas(is_disconnected):
                result = results.setdefault(index, ChoiceResult(index))
                result.text += delta.text
                result.token_ids.extend(delta.token_ids)
                result.logprobs.extend(delta.logprobs or [])
                result.finish_reason = delta.finish_reason or result.finish_reason
        finally:
            self.close()
        return [results[i] for i in sorted(results)]

    def _check_deadline(self, now: float) -> None:
        """APIError 504 once the request has run past REQUEST_TIMEOUT_S (queued time too)."""
        if self._deadline is not None and now >= self._deadline:
            self._fail("timeout")
            raise APIError(
                504,
                "the request ran past the server's time limit and was aborted",
                code="request_timeout",
            )

    async def _next(self, is_disconnected: IsDisconnected | None) -> StreamDelta:
        while True:
            now = time.monotonic()
            self._check_deadline(now)
            if is_disconnected is not None and now >= self._next_poll:
                self._next_poll = now + DISCONNECT_POLL_S
                if await is_disconnected():
                    self._fail("disconnect")
                    raise ClientDisconnected
            wait = self._wait_budget(now, polling=is_disconnected is not None)
            try:
                if wait is None:
                    return await self._queue.get()
                return await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                pass

    def _wait_budget(self, now: float, polling: bool) -> float | None:
        """Seconds until the next deadline or disconnect check; None: wait as long as needed."""
        times = [t for t in (self._deadline, self._next_poll if polling else None) if t is not None]
        return max(min(times) - now, 0.0) if times else None

    # ------------------------------------------------------------- metrics
    def _observe(self, index: int, delta: StreamDelta) -> None:
        sequence = self._sequences[index]
        if delta.usage is not None:
            sequence.usage = delta.usage
        if not delta.token_ids:
            return
        now = time.monotonic()
        if not self._first_token_seen:
            self._first_token_seen = True
            self._metrics.ttft.observe(now - self._arrival)
        if sequence.last_token_at is not None:
            self._metrics.itl.observe(now - sequence.last_token_at)
        sequence.last_token_at = now

    def _complete(self, finish_reason: str) -> None:
        self._metrics.e2e.observe(time.monotonic() - self._arrival)
        self._metrics.finished.labels(finish_reason).inc()
        self.close()

    def _fail(self, reason: str) -> None:
        self._metrics.failed.labels(reason).inc()
        self.close()

    async def _wait_polling(self, waited: asyncio.Future[Any],
                            is_disconnected: IsDisconnected | None) -> None:
        """`wait_polling` on this request's clock: past its time limit (REQUEST_TIMEOUT_S,
        from arrival) an APIError 504, a client gone ClientDisconnected; both count as
        failed."""
        try:
            await wait_polling(waited, self._deadline, is_disconnected)
        except DeadlinePassed:
            self._check_deadline(time.monotonic())  # the 504
            raise
        except ClientDisconnected:
            self._fail("disconnect")
            raise

    async def before_start(self, work: Awaitable[T], is_disconnected: IsDisconnected) -> T:
        """`work` done before the request's generation starts (a download), on the request's
        clock (`_wait_polling`), cancelled when the request gives up on it."""
        task = asyncio.ensure_future(work)
        try:
            await self._wait_polling(task, is_disconnected)
            return task.result()
        finally:
            task.cancel()

    def usage(self) -> UsageInfo:
        """Usage of the whole response: each prompt counted once, every sequence's tokens."""
        prompt = completion = cached = 0
        first_of_prompt: set[int] = set()
        for sequence in self._sequences.values():
            usage = sequence.usage
            if usage is None:
                continue
            completion += usage.completion_tokens
            if sequence.prompt not in first_of_prompt:
                first_of_prompt.add(sequence.prompt)
                prompt += usage.prompt_tokens
                cached += usage.cached_tokens
        info = UsageInfo.of(prompt, completion, cached)
        info.adjusted_max_tokens = self.adjusted_max_tokens
        return info

    # --------------------------------------------------------------- close
    def abandon(self) -> None:
        """Close a stream whose response stopped reading it: a stream that still had
        sequences running counts as a failed request (`disconnect`)."""
        if self._remaining and not self._closed:
            self._fail("disconnect")
        else:
            self.close()

    def close(self) -> None:
        """Abort whatever still runs; idempotent, safe from any exit path."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            rids = list(self._rids)
        self._metrics.in_flight -= 1
        if self._remaining:
            self._abort_running(rids)

    def _abort_running(self, rids: list[str]) -> None:
        """Stop the producer's work for `rids` (called once, from close)."""
        raise NotImplementedError


class GenerationStream(DeltaStream):
    """The engine requests behind one HTTP response: one per prompt, each with n sequences."""

    def __init__(
        self, engine: EnginePool, metrics: ServerMetrics, timeout_s: float, arrival: float
    ) -> None:
        super().__init__(metrics, timeout_s, arrival)
        self._engine = engine

    # ------------------------------------------------------------ submission
    async def start(self, prompts: Sequence[Prompt], params_for: ParamsFor, rid: str,
                    is_disconnected: IsDisconnected | None = None) -> None:
        """Tokenize every prompt (in a worker thread), then admit each into the pool (waiting
        for room in its queue, and leaving it if the client goes: ClientDisconnected) and
        submit it; raises on a bad request or a full pool."""
        work = self._loop.run_in_executor(None, self._tokenize_all, list(prompts), params_for)
        work.add_done_callback(_retrieve_exception)
        try:
            prepared = await asyncio.shield(work)
            for number, (ids, params) in enumerate(prepared):
                sub_rid = rid if len(prompts) == 1 else f"{rid}-{number}"
                await self._admit_and_submit(number, ids, params, sub_rid, is_disconnected)
        except BaseException:
            self.close()
            raise

    def _tokenize_all(
        self, prompts: list[Prompt], params_for: ParamsFor
    ) -> list[tuple[list[int], SamplingParams]]:
        prepared = []
        for prompt in prompts:
            ids = self._engine.tokenize(prompt)
            params = params_for(ids)
            adapted = self._engine.adapt_max_tokens(params.max_new_tokens, len(ids))
            if adapted != params.max_new_tokens:
                self.adjusted_max_tokens = adapted
                params = replace(params, max_new_tokens=adapted)
            self._engine.check(ids, params)
            prepared.append((ids, params))
        return prepared

    async def _admit_and_submit(
        self, number: int, ids: list[int], params: SamplingParams, sub_rid: str,
        is_disconnected: IsDisconnected | None,
    ) -> None:
        try:
            slot = await self._admit(ids, params.n, is_disconnected)
        except PoolBusy as exc:
            self._metrics.failed.labels("busy").inc()
            raise APIError(429, str(exc), code="server_busy",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except PoolDown as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None
        self._submit(number, ids, params, sub_rid, slot)

    async def _admit(self, ids: list[int], weight: int,
                     is_disconnected: IsDisconnected | None) -> EngineSlot:
        """The pool's admission, given up (leaving its queue) once the client is gone or the
        request's time limit passes."""
        admission = asyncio.ensure_future(self._engine.admit(ids, weight))
        try:  # its time limit counts the wait for room too
            await self._wait_polling(admission, is_disconnected)
            return admission.result()
        except BaseException:  # the client left, or this task was cancelled
            if not admission.done():
                admission.cancel()  # the pool drops the waiter (and any place it was given)
                with contextlib.suppress(asyncio.CancelledError, PoolBusy, PoolDown):
                    await admission
            if not admission.cancelled() and admission.exception() is None:
                self._engine.cancel(admission.result(), weight)  # placed as we gave up
            raise

    def _submit(
        self, number: int, ids: list[int], params: SamplingParams, sub_rid: str, slot: EngineSlot
    ) -> None:
        with self._lock:
            if self._closed:
                self._engine.cancel(slot, params.n)
                return
            self._base[sub_rid] = number * params.n
            for index in range(params.n):
                self._sequences[number * params.n + index] = _Sequence(prompt=number)
            try:
                self._engine.submit(ids, params, self._sink, rid=sub_rid, slot=slot)
            except PoolDown as exc:
                raise APIError(503, str(exc), code="engine_unavailable") from None
            self._remaining += params.n
            self._rids.append(sub_rid)

    def _abort_running(self, rids: list[str]) -> None:
        for rid in rids:
            self._engine.abort(rid)


class VLMStream(DeltaStream):
    """The one sequence a vision-language job produces, behind one HTTP response."""

    def __init__(
        self, service: VLMService, metrics: ServerMetrics, timeout_s: float, arrival: float
    ) -> None:
        super().__init__(metrics, timeout_s, arrival)
        self._service = service
        self._job: VLMJob | None = None

    def start(self, prompt: VLMPrompt, params: SamplingParams, rid: str) -> None:
        """Queue the job; a full queue is a 429 (and closes the stream)."""
        self._job = VLMJob(rid, prompt, params, self._sink)
        self._base[rid] = 0
        self._sequences[0] = _Sequence(prompt=0)
        try:
            self._service.submit(self._job)
        except VLMBusy as exc:
            self._metrics.failed.labels("busy").inc()
            self.close()
            raise APIError(429, str(exc), code="server_busy",
                           headers={"Retry-After": "1"}) from None
        self._remaining = 1
        self._rids.append(rid)

    def _abort_running(self, rids: list[str]) -> None:
        if self._job is not None:
            self._job.cancel()


class HFStream(DeltaStream):
    """The one sequence of the transformers baseline (`mode: "hf"`), behind one HTTP
    response: a thread pumps the baseline's text stream into the deltas, so the baseline
    shares the engine streams' in-flight count, deadline, disconnect checks and abort."""

    def __init__(self, metrics: ServerMetrics, timeout_s: float, arrival: float) -> None:
        super().__init__(metrics, timeout_s, arrival)
        self._stop = threading.Event()

    def start(self, baseline: Any, tokenizer: Any, prompt_ids: list[int],
              params: SamplingParams, rid: str) -> None:
        """Start the generation (`baseline` is a backend.hf.baseline.HFBaseline)."""
        self._base[rid] = 0
        self._sequences[0] = _Sequence(prompt=0)
        self._remaining = 1
        self._rids.append(rid)
        threading.Thread(target=self._pump, args=(baseline, tokenizer, prompt_ids, params, rid),
                         name="hf-baseline-pump", daemon=True).start()

    def _pump(self, baseline: Any, tokenizer: Any, prompt_ids: list[int],
              params: SamplingParams, rid: str) -> None:
        pieces = baseline.stream(prompt_ids, params.max_new_tokens,
                                 temperature=params.temperature, top_p=params.top_p,
                                 top_k=params.top_k, ignore_eos=params.ignore_eos,
                                 seed=params.seed)
        text = ""
        try:
            for piece in pieces:
                if self._stop.is_set():
                    return
                text += piece
                if piece:
                    self._sink(StreamDelta(rid, 0, piece, []))
            # the baseline streams text: its token count is the text re-tokenized
            completion = len(tokenizer.encode(text, add_special_tokens=False))
        except Exception as exc:
            logger.exception("the HF baseline failed")
            self._sink(StreamDelta(rid, 0, "", [], finish_reason="abort",
                                   error=f"the HF baseline failed: {exc}"))
            return
        finally:
            pieces.close()  # stops the generation at its next step
        reason = "length" if completion >= params.max_new_tokens else "stop"
        self._sink(StreamDelta(rid, 0, "", [], finish_reason=reason,
                               usage=Usage(len(prompt_ids), completion, 0)))

    def _abort_running(self, rids: list[str]) -> None:
        self._stop.set()


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    """A submission whose caller was cancelled still ends; its error must not go unread."""
    if not future.cancelled():
        future.exception()


class GenerationResponse(StreamingResponse):
    """A streaming response that closes its DeltaStream however the response ends.

    Starlette cancels the body iterator when the client disconnects; closing the stream here
    as well covers a cancellation that lands while a chunk is being sent.
    """

    def __init__(self, content: AsyncIterator[str], stream: DeltaStream, media_type: str):
        super().__init__(content, media_type=media_type, headers=NO_BUFFERING)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.abandon()


NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
