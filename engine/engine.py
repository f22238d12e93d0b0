"""Engine: a request's lifecycle around the scheduler loop, which runs in its own thread.

Callers (any thread, or asyncio) submit text, chat messages or token ids with sampling
parameters and get a stream of `StreamDelta`s back; `abort` stops a request within one step
and frees its KV. One step of the loop is: take new requests and aborts, schedule, run the
model, sample, turn tokens into text, release what finished.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backend.batch import ModelRunner, to_device_at_once
from backend.factory import create_runner
from backend.loader import ModelSource, eos_token_ids, load_tokenizer, resolve_model
from config import Config, get_config
from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.request import Req, Sink, StreamDelta, TokenLogprob, Usage
from engine.sampler import PendingSample, RequestHistory, SampleOutput, Sampler
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import Scheduler, StepPlan

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]] | list[int]
MAX_N = 16


@dataclass
class ReqState:
    """Per-request helpers owned by the loop thread."""

    history: RequestHistory
    detokenizer: IncrementalDetokenizer
    stopper: StopChecker


@dataclass
class EngineStats:
    """Counters since start-up (read by /metrics)."""

    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    num_steps: int = 0
    forward_tokens: int = 0
    future_tokens: int = 0  # inputs read on the device from the step before (overlap)


@dataclass
class GenerateOutput:
    """The whole result of one sequence of an offline `generate` call."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _InFlight:
    """A step whose sampled tokens are still on the device (or on their way to the host)."""

    plan: StepPlan
    reqs: list[Req]  # the sampled requests, in the rows of `sample`
    sample: PendingSample | None


class Engine:
    def __init__(
        self,
        config: Config | None = None,
        *,
        source: ModelSource | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        self.config = config or get_config()
        self.source = source or resolve_model(self.config)
        self.tokenizer = load_tokenizer(self.source, self.config.trust_remote_code)
        self.model_name = self.source.name
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._reqs: dict[str, list[Req]] = {}
        self._stopped = threading.Event()
        self._in_flight: _InFlight | None = None
        started: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(runner, started), name="minisgl-scheduler", daemon=True
        )
        self._thread.start()
        error = started.get()
        if error is not None:
            raise error

    def _start(self, runner: ModelRunner | None) -> None:
        """Build the runner and the step machinery on the loop thread: all torch work stays
        on one thread (a second OpenMP thread team on a small CPU slows every op ~2x)."""
        if self.config.num_threads > 0:
            torch.set_num_threads(self.config.num_threads)
        device = self.config.resolved_device()
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # kernels launch on this thread's current device
        self.runner = runner or create_runner(self.config, self.source)
        self.info = self.runner.info
        self.eos_ids = frozenset(eos_token_ids(self.source, self.tokenizer)) | frozenset(
            self.info.eos_token_ids
        )
        self.max_context_len = self.info.max_context_len
        self.scheduler = Scheduler(
            self.config,
            self.runner.num_kv_slots,
            self.runner.device,
            max_context_len=self.max_context_len,
        )
        self.sampler = Sampler(self.info.vocab_size, self.runner.device, seed=self.config.seed)
        self.overlap = self.config.overlap_schedule == "on" or (
            self.config.overlap_schedule == "auto" and self.runner.device.type == "cuda"
        )
        # Everything built so far (model, tokenizer, tables) lives as long as the engine:
        # keep it out of the collector's full passes, which would otherwise walk it all and
        # stall a step for tens of milliseconds.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------- public API
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of text, of chat messages (the model's chat template) or of ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        if prompt and all(isinstance(m, dict) for m in prompt):
            messages: Any = prompt
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        raise InvalidRequestError("prompt must be text, chat messages or token ids", "prompt")

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        sink: Sink,
        rid: str | None = None,
    ) -> str:
        """Queue a request; `sink` gets its deltas from the loop thread. Returns its id."""
        params.validate(MAX_N)
        ids = self.tokenize(prompt)
        self._check_fits(ids, params)
        rid = rid or uuid.uuid4().hex
        first = Req(rid=rid, prompt_ids=ids, params=params, sink=sink)
        reqs = [first]
        for index in range(1, params.n):
            reqs.append(
                Req(
                    rid=rid,
                    prompt_ids=ids,
                    params=_child_params(params, index),
                    sink=sink,
                    index=index,
                    waits_for=first,
                )
            )
        for req in reqs:
            req.state = self._new_state(req)
        self._inbox.put(("add", reqs))
        return rid

    def abort(self, rid: str) -> None:
        """Stop a request (all of its n sequences) within one step; frees its KV."""
        self._inbox.put(("abort", rid))

    def stream(self, prompt: Prompt, params: SamplingParams) -> Generator[StreamDelta, None, None]:
        """Blocking stream of deltas; closing the generator early aborts the request."""
        deltas: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        rid = self.submit(prompt, params, deltas.put)
        remaining = params.n
        try:
            while remaining:
                delta = deltas.get()
                remaining -= delta.finished
                yield delta
        finally:
            if remaining:
                self.abort(rid)

    async def astream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """asyncio stream of deltas; cancelling the consumer aborts the request."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[StreamDelta] = asyncio.Queue()

        def sink(delta: StreamDelta) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, delta)

        rid = self.submit(prompt, params, sink)
        remaining = params.n
        try:
            while remaining:
                delta = await deltas.get()
                remaining -= delta.finished
                yield delta
        finally:
            if remaining:
                self.abort(rid)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[GenerateOutput]]:
        """Offline batch: every prompt at once; per prompt, its n outputs in index order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        done = threading.Event()
        outputs: dict[str, dict[int, GenerateOutput]] = {}
        pending = sum(p.n for p in plist)
        lock = threading.Lock()

        def sink(delta: StreamDelta) -> None:
            nonlocal pending
            out = outputs.setdefault(delta.rid, {}).setdefault(
                delta.index, GenerateOutput("", [], "", Usage(0, 0, 0), delta.index)
            )
            out.text += delta.text
            out.token_ids.extend(delta.token_ids)
            out.logprobs.extend(delta.logprobs or [])
            if delta.finished:
                out.finish_reason = delta.finish_reason or ""
                out.usage = delta.usage or out.usage
                with lock:
                    pending -= 1
                    if pending == 0:
                        done.set()

        rids = [self.submit(p, sp, sink) for p, sp in zip(prompts, plist)]
        done.wait()
        return [[outputs[rid][i] for i in sorted(outputs[rid])] for rid in rids]

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` on the loop thread between steps and return its result."""
        result: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._inbox.put(("call", (fn, result)))
        ok, value = result.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def insert_prefix(self, prompt: Prompt) -> int:
        """Compute a prefix once and keep it in the radix cache; returns its token count."""
        ids = self.tokenize(prompt)
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        self.generate([ids], params)
        return len(ids)

    def flush_cache(self) -> int:
        """Drop every unreferenced prefix from the caches; returns freed slots."""

        def flush() -> int:
            self.scheduler.prefill_cache.clear()
            return self.scheduler.radix.reset()

        return int(self.call(flush))

    def snapshot(self) -> dict[str, Any]:
        """Queue lengths, KV usage and counters (for /metrics)."""
        sched = self.scheduler
        total = sched.allocator.num_total
        return {
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "kv_total_slots": total,
            "kv_used_slots": sched.num_request_slots,
            "kv_cached_slots": sched.radix.evictable_size,
            "kv_usage": sched.num_request_slots / total if total else 0.0,
            "num_preemptions": sched.stats.num_preemptions,
            "num_prefill_cache_hits": sched.stats.num_prefill_cache_hits,
            **vars(self.stats),
        }

    def warmup(self) -> None:
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        self.generate(["Hello"], params)

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running (False after shutdown or if it died)."""
        return self._thread.is_alive() and not self._stopped.is_set()

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)
        gc.unfreeze()  # let the collector reach what start-up froze, this engine's included

    # -------------------------------------------------------------- validation
    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        limit = self.max_context_len
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {limit}", "prompt"
            )
        if len(ids) + params.max_new_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens",
                "max_tokens",
            )
        if len(ids) + params.max_new_tokens > self.scheduler.allocator.num_total:
            raise InvalidRequestError(
                f"prompt + max_tokens ({len(ids) + params.max_new_tokens}) exceeds the KV "
                f"cache of {self.scheduler.allocator.num_total} tokens",
                "max_tokens",
            )
        vocab = self.info.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", "prompt")

    def _new_state(self, req: Req) -> ReqState:
        return ReqState(
            history=RequestHistory(req.prompt_ids, req.params.seed, self.runner.device),
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, req.prompt_ids, req.params.skip_special_tokens
            ),
            stopper=StopChecker(req.params.stop),
        )

    # ------------------------------------------------------------- loop thread
    def _run(
        self, runner: ModelRunner | None, started: queue.SimpleQueue[BaseException | None]
    ) -> None:
        try:
            self._start(runner)
        except BaseException as exc:
            started.put(exc)
            return
        started.put(None)
        self._loop()

    @property
    def _has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain(block=not self._has_work)
            if self._stopped.is_set() or not self._has_work:
                continue
            try:
                self._step()
            except Exception as exc:  # keep serving: fail what was in flight, go on
                logger.exception("engine step failed")
                self._fail_all(f"engine error: {exc}")

    def _drain(self, block: bool) -> None:
        try:
            kind, payload = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(kind, payload)
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            for req in payload:
                self._reqs.setdefault(req.rid, []).append(req)
                self.scheduler.add(req)
                self.stats.num_requests += 1
        elif kind == "abort":
            for req in self._reqs.pop(payload, []):
                if not req.finished:
                    self.scheduler.remove(req)
                    self.stats.num_aborted += 1
                    self._finish(req, "abort", "")
        elif kind == "call":
            fn, result = payload
            try:
                result.put((True, fn()))
            except Exception as exc:
                result.put((False, exc))

    def _step(self) -> None:
        """One step. With overlap, the host reads the previous step's tokens while the
        device runs this step's forward, and leaves this step's sampling in flight; without,
        it reads them at once. Either way the sampler sees every earlier token."""
        plan = self.scheduler.schedule()
        if plan is None:
            if self._in_flight is not None:
                self._read_in_flight()
            else:
                self._reject_unschedulable()
            return
        logits = self._forward(plan)
        self.stats.num_steps += 1
        self.stats.forward_tokens += plan.num_forward_tokens
        self.scheduler.cache_prompts(plan, logits)
        if self._in_flight is not None:
            self._read_in_flight()
        sample = None
        sampled = plan.sample_reqs
        if sampled and logits is not None:
            # Rows of requests that finished while this step was queued are not sampled: the
            # shared generator then draws for the same rows as without overlap.
            live = [i for i, r in enumerate(sampled) if not r.finished]
            if len(live) < len(sampled):
                [rows] = to_device_at_once([live], logits.device)
                logits = logits.index_select(0, rows)
                sampled = [sampled[i] for i in live]
            if sampled:
                histories = [r.state.history for r in sampled]
                sample = self.sampler.sample_async(logits, [r.params for r in sampled],
                                                   histories)
            for req in sampled:
                req.num_future += 1
        self._in_flight = _InFlight(plan, sampled, sample)
        if not self.overlap:
            self._read_in_flight()

    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        """Queue the step's forward (future tokens read on the device); its logits, with
        the prefill-cache hits' after them."""
        logits = None
        if plan.batch is not None:
            if plan.future_inputs:
                self._fill_future_inputs(plan.batch.input_ids, plan.future_inputs)
                self.stats.future_tokens += len(plan.future_inputs)
            logits = self.runner.forward(plan.batch)
        if plan.cached_logits:
            cached = torch.stack(plan.cached_logits)
            logits = cached if logits is None else torch.cat([logits, cached])
        return logits

    def _fill_future_inputs(self, input_ids: torch.Tensor,
                            future_inputs: list[tuple[int, Req]]) -> None:
        """Copy each future token from the in-flight step's sampled ids into its input row."""
        previous = self._in_flight
        assert previous is not None and previous.sample is not None
        source_rows = {id(r): i for i, r in enumerate(previous.reqs)}
        targets = [row for row, _ in future_inputs]
        sources = [source_rows[id(req)] for _, req in future_inputs]
        target_t, source_t = to_device_at_once([targets, sources], input_ids.device)
        input_ids.index_copy_(0, target_t, previous.sample.token_ids.index_select(0, source_t))

    def _read_in_flight(self) -> None:
        """Read the in-flight step's tokens (waiting for their copy only), emit them, and
        release the requests that finished."""
        done, self._in_flight = self._in_flight, None
        assert done is not None
        reqs = done.reqs
        if done.sample is not None:
            out = done.sample.result()
            for row, req in enumerate(reqs):
                req.num_future -= 1
                if not req.finished:  # finished or aborted while the step ran: dropped
                    self._on_token(req, row, out)
        self.scheduler.release_finished(reqs)

    def _on_token(self, req: Req, row: int, out: SampleOutput) -> None:
        token = out.token_ids[row]
        req.token_ids.append(token)
        state: ReqState = req.state
        state.history.append(token)
        if req.num_output == 1:
            self.stats.prompt_tokens += len(req.prompt_ids)
            self.stats.cached_tokens += max(req.num_prompt_cached, 0)
        self.stats.generation_tokens += 1
        logprobs = None
        if out.logprobs is not None and req.params.logprobs:
            top = out.top_logprobs[row] if out.top_logprobs else []
            logprobs = [TokenLogprob(token, out.logprobs[row], top[: req.params.top_logprobs])]
        params = req.params
        reason: str | None = None
        text = ""
        matched = False
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        else:
            text, matched = state.stopper.process(state.detokenizer.add(token))
            if matched:
                reason = "stop"
            elif req.num_output >= params.max_new_tokens or req.seq_len >= self.max_context_len:
                reason = "length"
        if reason is not None and not matched:
            tail, matched = state.stopper.process(state.detokenizer.flush())
            text += tail if matched else tail + state.stopper.flush()
            reason = "stop" if matched else reason
        if reason is None:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s[%d] token %d %r", req.rid, req.index, token, text)
            req.sink(StreamDelta(req.rid, req.index, text, [token], logprobs))
            return
        self._finish(req, reason, text, [token], logprobs)

    def _finish(
        self,
        req: Req,
        reason: str,
        text: str,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        req.finish_reason = reason
        self.stats.num_finished += 1
        siblings = self._reqs.get(req.rid, [])
        if all(r.finished for r in siblings):
            self._reqs.pop(req.rid, None)
        req.sink(
            StreamDelta(
                req.rid, req.index, text, token_ids or [], logprobs, reason, req.usage(), error
            )
        )

    def _reject_unschedulable(self) -> None:
        """Nothing could be scheduled: if nothing runs either, the head request can never fit."""
        sched = self.scheduler
        if sched.running or not sched.waiting:
            time.sleep(0.001)
            return
        blocked = [r for r in sched.waiting if r.waits_for is None or r.waits_for.finished]
        if not blocked:
            return
        req = blocked[0]
        sched.remove(req)
        self._finish(req, "abort", "", error="request does not fit in the KV cache")

    def _fail_all(self, message: str) -> None:
        self._in_flight = None
        sched = self.scheduler
        for req in list(sched.running) + list(sched.waiting):
            sched.remove(req)
            if not req.finished:
                self._finish(req, "abort", "", error=message)


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sequence `index` of an n > 1 request: same, but its own seed."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, seed=seed)
