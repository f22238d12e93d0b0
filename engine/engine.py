"""Engine: the native engine, a scheduler loop over a paged runner in its own thread.

The request lifecycle (submit / stream / abort, tokenizer, detokenizer, stop strings) is
`EngineBase`'s; `abort` stops a request within one step and frees its KV. One step of the
loop is: take new requests and aborts, schedule, run the model, sample, turn tokens into
text, release what finished.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from backend.batch import ModelRunner, to_device_at_once
from backend.factory import create_runner
from backend.loader import ModelSource, eos_token_ids
from config import Config, ConfigError
from engine.base import MAX_N, EngineBase, EngineStats, GenerateOutput, Prompt, TextState
from engine.request import Req, StreamDelta, TokenLogprob
from engine.sampler import PendingSample, RequestHistory, SampleOutput, Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, StepPlan

logger = logging.getLogger(__name__)

WARMUP_LONG_TOKENS = 300  # a context the split-K decode kernel splits (over its 256-token slice)
WARMUP_NEW_TOKENS = 32  # what the warm-up's decoding requests generate
WARMUP_TIMEOUT_S = 300.0  # per warm-up request pair, first kernel compiles included

__all__ = ["MAX_N", "Engine", "EngineStats", "GenerateOutput", "Prompt"]


@dataclass
class ReqState(TextState):
    """Per-request helpers owned by the loop thread: stream text plus the sampler history."""

    history: RequestHistory


@dataclass
class _InFlight:
    """A step whose sampled tokens are still on the device (or on their way to the host)."""

    plan: StepPlan
    reqs: list[Req]  # the sampled requests, in the rows of `sample`
    sample: PendingSample | None


class Engine(EngineBase):
    """The native engine: continuous batching on a paged KV pool with radix prefix reuse."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        source: ModelSource | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        super().__init__(config, source=source)
        self._in_flight: _InFlight | None = None
        self._warm_calls = itertools.count()  # numbers each warm-up prompt's text
        self._start_loop(lambda: self._start(runner))

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
            cascade_min_prefix=self._cascade_min_prefix(),
            cascade_max_rows=getattr(self.runner, "cascade_max_rows", 0),
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

    def warmup(self) -> None:
        """The base warm-up; on CUDA also, beside a request decoding a short and then a long
        context, a prompt extending that context's cached prompt in the same steps (mixed
        steps whose one-token row takes the split-K kernel with one slice, then with
        several; the extend kernel's tiles for new tokens longer than their cached prefix,
        then shorter), the same extend with nothing beside it, and with cascade attention
        the first beside two requests decoding as a cascade group (a mixed step with a
        plan), and decode batches large enough to start longest request first (one slice
        and several), so those launches compile here and not in the first such step of
        traffic."""
        super().warmup()
        if self.runner.device.type == "cuda":
            for context in (8, WARMUP_LONG_TOKENS):
                self._warm_prefill_beside_decode(context)
            self._warm_extend_alone(WARMUP_LONG_TOKENS)
            self._warm_ordered_decode()
            if self.scheduler.cascade_min_prefix and self.scheduler.radix.enabled:
                self._warm_prefill_beside_decode(
                    max(WARMUP_LONG_TOKENS, self.scheduler.cascade_min_prefix + 8), copies=2)

    def _warm_prompts(self, context: int, what: str, copies: int = 1
                      ) -> tuple[list[int], list[int]] | None:
        """The warm-up's prompt of about `context` tokens, and it followed by a text of its
        own per call (a prompt the caches already hold would not run) of ~100 tokens (longer
        than one of the extend kernel's small tiles); None where `copies` of the first and
        the second, with room to decode, would not fit the context or half the KV pool."""
        unit = self.tokenize("Hello, ")
        first = unit * (context // len(unit) + 1)
        text = f" Warm-up prompt {next(self._warm_calls)}: {what}." + (
            " It extends the cached prompt before it." * 12)
        second = first + self.tokenize(text)
        room = WARMUP_NEW_TOKENS + 8
        if (len(second) + room > self.max_context_len
                or copies * (len(first) + room) + len(second) + room
                > self.runner.num_kv_slots // 2):
            return None
        return first, second

    def _warm_ordered_decode(self) -> None:
        """Decode steps of as many rows as start longest request first (the triton kernel
        set's launch-order kernel and its ordered split kernel), over short contexts (one
        slice) and long ones (several); each prompt its own, so no cascade group forms.
        CUDA graphs compile these at capture; eager decode steps would in traffic."""
        try:
            from backend.sglang.kernels.triton.decode_attention import ROW_ORDER_MIN_ROWS
        except ImportError:  # no triton: no such kernels
            return
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        for words in (4, WARMUP_LONG_TOKENS):
            self.generate([f"{row} " + "word " * words for row in range(ROW_ORDER_MIN_ROWS)],
                          params)

    def _warm_extend_alone(self, context: int) -> None:
        """A prompt extending the cached warm-up prompt of `context` tokens, alone in its
        step (a conversation's next turn on an idle server)."""
        prompts = self._warm_prompts(context, "an extend alone")
        if prompts is not None:
            self.generate([prompts[1]], SamplingParams(max_new_tokens=1, temperature=0.0,
                                                       ignore_eos=True))

    def _warm_prefill_beside_decode(self, context: int, copies: int = 1) -> None:
        """`copies` requests of one prompt of about `context` tokens (the later ones reuse
        the first's cached slots, so several decode as a cascade group), prefilled and then
        decoding; once each has its first token, a second prompt (that prompt and a text of
        its own) is queued from the loop thread, so that it extends the cached prompt while
        they still decode. At most WARMUP_TIMEOUT_S."""
        prompts = self._warm_prompts(context, "prefilled beside decoding requests", copies)
        if prompts is None:
            return
        first, second = prompts
        queued, first_done, second_done = (threading.Event() for _ in range(3))
        decoding: set[str] = set()
        finished: set[str] = set()

        def second_sink(delta: StreamDelta) -> None:
            if delta.finished:
                second_done.set()

        def first_sink(delta: StreamDelta) -> None:  # on the loop thread
            if delta.token_ids and not delta.finished:
                decoding.add(delta.rid)
            if len(decoding - finished) == copies and not queued.is_set():
                queued.set()
                self.submit(second, SamplingParams(max_new_tokens=2, temperature=0.0,
                                                   ignore_eos=True), second_sink)
            if delta.finished:
                finished.add(delta.rid)
                if len(finished) == copies:
                    if not queued.is_set():
                        second_done.set()  # nothing was queued beside them
                    first_done.set()

        params = SamplingParams(max_new_tokens=WARMUP_NEW_TOKENS, temperature=0.0,
                                ignore_eos=True)
        self.submit_many([(first, params, first_sink, None)] * copies)
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        for event in (first_done, second_done):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("warm-up did not finish in %.0f s", WARMUP_TIMEOUT_S)
                return

    def _cascade_min_prefix(self) -> int:
        """CASCADE_MIN_PREFIX where the runner does cascade attention, else 0 (off)."""
        if getattr(self.runner, "cascade_attention", False):
            return self.config.cascade_min_prefix
        if self.config.cascade_attention == "1":
            raise ConfigError("CASCADE_ATTENTION=1 needs the native runner with a kernel set "
                              "that has cascade attention (triton)")
        return 0

    # ------------------------------------------------------------- public API
    @property
    def device_name(self) -> str:
        return str(self.runner.device)

    @property
    def dtype_name(self) -> str:
        model = getattr(self.runner, "model", None)  # the native and transformers runners
        params = model.parameters() if model is not None else iter(())
        floats = (p.dtype for p in params if p.is_floating_point())
        return str(next(floats, "unknown")).removeprefix("torch.")

    def flush_cache(self) -> int:
        """Drop every unreferenced prefix from the caches; returns freed slots."""

        return int(self.call(self.scheduler.flush_cache))

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

    def _kv_capacity(self) -> int | None:
        return self.scheduler.allocator.num_total

    def _new_state(self, req: Req) -> ReqState:
        detokenizer, stopper = self._text_state(req)
        history = RequestHistory(req.prompt_ids, req.params.seed, self.runner.device)
        return ReqState(detokenizer=detokenizer, stopper=stopper, history=history)

    # ------------------------------------------------------------- loop thread
    @property
    def _has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def _add(self, reqs: list[Req]) -> None:
        for req in reqs:
            self.scheduler.add(req)

    def _abort(self, rid: str) -> None:
        for req in self._reqs.pop(rid, []):
            if not req.finished:
                self.scheduler.remove(req)
                self.stats.num_aborted += 1
                self._finish(req, "abort", "")

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
        req.state.history.append(token)
        logprobs = None
        if out.logprobs is not None and req.params.logprobs:
            top = out.top_logprobs[row] if out.top_logprobs else []
            logprobs = [TokenLogprob(token, out.logprobs[row], top[: req.params.top_logprobs])]
        self._deliver(req, token, logprobs)

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

    def _fail_all(self, message: str, status: int = 500) -> None:
        self._in_flight = None
        for req in self.scheduler.drop_all():
            if not req.finished:
                self._finish(req, "abort", "", error=message, error_status=status)

