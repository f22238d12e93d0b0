"""What every engine shares: the request lifecycle around a loop thread that owns the model.

Callers (any thread, or asyncio) submit text, chat messages or token ids with sampling
parameters and get a stream of `StreamDelta`s back; `abort` stops a request within one step.
`EngineBase` validates and tokenizes on the caller's thread, posts requests to the loop
thread's inbox, and turns each token the loop produces into stream text and a finish reason
(detokenizer, stop strings, EOS, max_tokens), so every engine streams and stops alike.

A subclass builds its model on the loop thread (`_start`), takes requests and aborts
(`_add`, `_abort`), runs one step of its own (`_step`) and reports its state (`snapshot`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2

from backend.batch import ModelInfo
from backend.loader import ModelSource, load_tokenizer, resolve_model
from config import Config, get_config
from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.mailbox import loop_mailbox
from engine.request import Req, Sink, StreamDelta, TokenLogprob, Usage
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)
LIVENESS_POLL_S = 0.5  # how often a caller waiting on the loop checks that it still runs
# what caching a prefix runs (insert_prefix, warming): its prompt and one greedy token
PREFIX_PARAMS = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)

Prompt = str | list[dict[str, Any]] | list[int]
MAX_N = 16


def _token_ids(prompt: Any) -> list[int] | None:
    """`prompt` as a list of ints when it is a non-empty list or tuple of integers, else
    None. Through a C array: thousands of ids cost microseconds, not a Python loop."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return None
    try:
        return array.array("q", prompt).tolist()
    except TypeError:  # an item that is not an integer
        return None
    except OverflowError:  # beyond 64 bits: `check_fits` reports it outside the vocabulary
        return [int(t) for t in prompt] if all(isinstance(t, int) for t in prompt) else None


@dataclass
class TextState:
    """A request's stream text: its detokenizer and stop-string checker (loop thread)."""

    detokenizer: IncrementalDetokenizer
    stopper: StopChecker


# the keys of an engine snapshot that are levels; every other number there is a count
SNAPSHOT_GAUGES = frozenset({"num_running", "num_waiting", "kv_total_slots", "kv_used_slots",
                             "kv_cached_slots", "kv_usage"})


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


class EngineBase:
    """The engine surface the pool and the server use; the loop itself is the subclass's.

    Set on the loop thread by `_start`: `info` (ModelInfo), `eos_ids`, `max_context_len`.
    """

    info: ModelInfo
    eos_ids: frozenset[int]
    max_context_len: int

    def __init__(self, config: Config | None = None, *, source: ModelSource | None = None
                 ) -> None:
        self.config = config or get_config()
        self.source = source or resolve_model(self.config)
        self.tokenizer = load_tokenizer(self.source, self.config.trust_remote_code)
        self.model_name = self.source.name
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._reqs: dict[str, list[Req]] = {}
        self._stopped = threading.Event()
        self._turn_hooks: list[Callable[[], None]] = []

    def add_turn_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook` on the loop thread after every turn of the loop (a step, or a drain of
        the inbox while idle): every delta of that turn has gone to its sink by then."""
        self._turn_hooks.append(hook)

    def _start_loop(self, start: Callable[[], None]) -> None:
        """Run `start` then the loop on a new thread; raise what `start` raised."""
        started: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(start, started), name="minisgl-scheduler", daemon=True
        )
        self._thread.start()
        error = started.get()
        if error is not None:
            raise error

    # ----------------------------------------------------------- subclass hooks
    def _add(self, reqs: list[Req]) -> None:
        """Take new requests (the n sequences of one submit), on the loop thread."""
        raise NotImplementedError

    def _abort(self, rid: str) -> None:
        """Stop every sequence of request `rid`, on the loop thread."""
        raise NotImplementedError

    @property
    def _has_work(self) -> bool:
        raise NotImplementedError

    def _step(self) -> None:
        """One step of the loop: run the model once and deliver the tokens it produced."""
        raise NotImplementedError

    def _fail_all(self, message: str, status: int = 500) -> None:
        """A step raised (or the engine stops): end every live request with `message` as
        its error, mapped to HTTP `status`."""
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Whether the loop has requests to step (read on the loop thread)."""
        return bool(self._has_work)

    def _kv_capacity(self) -> int | None:
        """Most tokens (prompt + output) one sequence may hold; None: no limit but context."""
        return None

    def _new_state(self, req: Req) -> Any:
        return TextState(*self._text_state(req))

    @property
    def device_name(self) -> str:
        """Where the model runs (health and engine views)."""
        raise NotImplementedError

    @property
    def dtype_name(self) -> str:
        """The dtype the model computes in (its weights' float dtype)."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """Queue lengths, KV usage and counters (for /metrics): the SNAPSHOT_GAUGES keys
        are levels now, every other number a count since start-up (it never goes down)."""
        raise NotImplementedError

    def flush_cache(self) -> int:
        """Drop every unreferenced cached prefix; returns the freed tokens."""
        raise NotImplementedError

    # ------------------------------------------------------------- public API
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of text, of chat messages (the model's chat template) or of ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        ids = _token_ids(prompt)
        if ids is not None:
            return ids
        if prompt and all(isinstance(m, dict) for m in prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequestError(
                    "this model has no chat template: send text to /v1/completions instead",
                    "messages")
            messages: Any = prompt
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            except jinja2.TemplateError as exc:  # e.g. a template without a system role
                raise InvalidRequestError(
                    f"the chat template rejected the messages: {exc}", "messages") from exc
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        raise InvalidRequestError("prompt must be text, chat messages or token ids", "prompt")

    def check_params(self, params: SamplingParams) -> None:
        """Raise InvalidRequestError for parameters this engine cannot honour."""
        params.validate(MAX_N)

    def prepare(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Validate a request and return its prompt's token ids (InvalidRequestError when it
        cannot be served: bad parameters, an empty prompt, or one that does not fit)."""
        self.check_params(params)
        ids = self.tokenize(prompt)
        self.check_fits(ids, params)
        return ids

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        sink: Sink,
        rid: str | None = None,
    ) -> str:
        """Queue a request; `sink` gets its deltas from the loop thread. Returns its id."""
        [rid] = self.submit_many([(prompt, params, sink, rid)])
        return rid

    def submit_many(
        self, requests: Sequence[tuple[Prompt, SamplingParams, Sink, str | None]]
    ) -> list[str]:
        """Queue `(prompt, params, sink, rid)` requests together: the loop admits them in
        one go (all are validated first; a bad one queues none). Returns their ids."""
        rids: list[str] = []
        reqs: list[Req] = []
        for prompt, params, sink, rid in requests:
            rid = rid or uuid.uuid4().hex
            rids.append(rid)
            reqs.extend(self._requests(rid, self.prepare(prompt, params), params, sink))
        for req in reqs:
            req.state = self._new_state(req)
        self._inbox.put(("add", reqs))
        if not self.alive:  # a dead loop never reads it (one that died just now failed it)
            raise RuntimeError(f"the engine on {self.device_name} has stopped")
        return rids

    def _requests(self, rid: str, ids: list[int], params: SamplingParams, sink: Sink
                  ) -> list[Req]:
        """The request and, for n > 1, its siblings (which wait for its prefill)."""
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
        return reqs

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
        mailbox = loop_mailbox(asyncio.get_running_loop())
        deltas: asyncio.Queue[StreamDelta] = asyncio.Queue()

        def sink(delta: StreamDelta) -> None:
            mailbox.post(deltas.put_nowait, delta)

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
        """Offline batch: every prompt at once; per prompt, its n outputs in index order.
        `params`: one for all prompts, or one per prompt (ValueError otherwise)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        done = threading.Event()
        outputs: dict[str, dict[int, GenerateOutput]] = {}
        pending = sum(p.n for p in plist)
        lock = threading.Lock()

        def sink(delta: StreamDelta) -> None:
            nonlocal pending
            sequences = outputs.setdefault(delta.rid, {})
            out = sequences.get(delta.index)
            if out is None:
                out = sequences[delta.index] = GenerateOutput(
                    "", [], "", Usage(0, 0, 0), delta.index)
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

        rids = self.submit_many([(p, sp, sink, None) for p, sp in zip(prompts, plist)])
        while not done.wait(LIVENESS_POLL_S):
            # a loop that died ends its requests just after: one more poll, never for good
            if not self.alive and not done.wait(LIVENESS_POLL_S):
                raise RuntimeError(f"the engine on {self.device_name} has stopped")
        return [[outputs[rid][i] for i in sorted(outputs[rid])] for rid in rids]

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run `fn` on the loop thread between steps and return its result."""
        result: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._inbox.put(("call", (fn, result)))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LIVENESS_POLL_S if deadline is None else min(
                LIVENESS_POLL_S, max(0.0, deadline - time.monotonic()))
            try:
                ok, value = result.get(timeout=wait)
                break
            except queue.Empty:
                if not self.alive:
                    raise RuntimeError(f"the engine on {self.device_name} has stopped") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
        if not ok:
            raise value
        return value

    def insert_prefix(self, prompt: Prompt) -> int:
        """Compute a prefix once and keep it in the prefix cache; returns its token count."""
        ids = self.tokenize(prompt)
        self.generate([ids], PREFIX_PARAMS)
        return len(ids)

    def warmup(self) -> None:
        """A short generation through every step kind (a multi-token prefill beside a
        one-token one, then decode of both), so first requests do not pay for kernels that
        compile or tune on first use."""
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        self.generate(["Hello, " * 20, "Hello"], params)

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
    def check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError unless the prompt and max_tokens fit the context and
        the KV cache, with every id in the vocabulary."""
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
        capacity = self._kv_capacity()
        if capacity is not None and len(ids) + params.max_new_tokens > capacity:
            raise InvalidRequestError(
                f"prompt + max_tokens ({len(ids) + params.max_new_tokens}) exceeds the KV "
                f"cache of {capacity} tokens",
                "max_tokens",
            )
        vocab = self.info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", "prompt")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})",
                                      "stop_token_ids")

    def _text_state(self, req: Req) -> tuple[IncrementalDetokenizer, StopChecker]:
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, req.prompt_ids, req.params.skip_special_tokens
        )
        return detokenizer, StopChecker(req.params.stop)

    # ------------------------------------------------------------- loop thread
    def _run(
        self, start: Callable[[], None], started: queue.SimpleQueue[BaseException | None]
    ) -> None:
        try:
            start()
        except BaseException as exc:
            started.put(exc)
            return
        started.put(None)
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._turn()
                for hook in self._turn_hooks:
                    hook()
        except BaseException:  # outside a step (a step's own error is handled in _turn)
            self._stopped.set()  # reads as stopped before its requests hear of it
            self._end_open_work("engine error: the engine loop stopped")
            logger.exception("engine loop on %s stopped", self.device_name)
        else:  # shut down: whoever still waits on a request hears of it
            self._end_open_work("engine shut down")

    def _end_open_work(self, message: str) -> None:
        """The loop has ended: every live or queued request ends with `message` (a 503:
        the engine is gone), every queued call fails."""
        with contextlib.suppress(Exception):
            self._fail_all(message, status=503)
        self._fail_inbox(message)

    def _fail_inbox(self, message: str) -> None:
        """After the loop ended: end the requests and calls still queued for it."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                for req in payload:
                    self._finish(req, "abort", "", error=message, error_status=503)
            elif kind == "call":
                payload[1].put((False, RuntimeError(message)))

    def _turn(self) -> None:
        """Take what the inbox holds, then run one step if there is work."""
        self._drain(block=not self._has_work)
        if self._stopped.is_set() or not self._has_work:
            return
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
                self.stats.num_requests += 1
            self._add(payload)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "call":
            fn, result = payload
            try:
                result.put((True, fn()))
            except Exception as exc:
                result.put((False, exc))

    def _deliver(self, req: Req, token: int, logprobs: list[TokenLogprob] | None) -> None:
        """Append a sampled token to `req`; stream its text, or finish the request (EOS, a
        stop token or string, max_tokens, the context)."""
        req.token_ids.append(token)
        num_output = req.num_output
        stats = self.stats
        if num_output == 1:
            stats.prompt_tokens += len(req.prompt_ids)
            stats.cached_tokens += max(req.num_prompt_cached, 0)
        stats.generation_tokens += 1
        state: TextState = req.state
        params = req.params
        reason: str | None = None
        text = ""
        matched = False
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_set:
            reason = "stop"
        else:
            text, matched = state.stopper.process(state.detokenizer.add(token))
            if matched:
                reason = "stop"
            elif num_output >= params.max_new_tokens or req.seq_len >= self.max_context_len:
                reason = "length"
        if reason is not None and not matched:
            tail, matched = state.stopper.process(state.detokenizer.flush())
            text += tail if matched else tail + state.stopper.flush()
            reason = "stop" if matched else reason
        if reason is None:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s[%d] token %d %r", req.rid, req.index, token, text)
            self._to_sink(req, StreamDelta(req.rid, req.index, text, [token], logprobs))
            return
        self._finish(req, reason, text, [token], logprobs)

    def _to_sink(self, req: Req, delta: StreamDelta) -> None:
        """Hand `delta` to the request's sink. A sink that raises (its consumer is gone)
        costs its own request only: that is aborted, the loop and the others go on."""
        if req.sink_failed:
            return
        try:
            req.sink(delta)
        except Exception:
            logger.exception("the consumer of request %s failed; aborting it", req.rid)
            for sibling in self._reqs.get(req.rid, [req]):
                sibling.sink_failed = True
            self.abort(req.rid)

    def _finish(
        self,
        req: Req,
        reason: str,
        text: str,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
        error_status: int = 500,
    ) -> None:
        req.finish_reason = reason
        self.stats.num_finished += 1
        siblings = self._reqs.get(req.rid, [])
        if all(r.finished for r in siblings):
            self._reqs.pop(req.rid, None)
        self._to_sink(req, StreamDelta(
            req.rid, req.index, text, token_ids or [], logprobs, reason, req.usage(), error,
            error_status))


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of sequence `index` of an n > 1 request: same, but its own seed."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, seed=seed)
