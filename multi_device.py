"""The engine pool: one engine per device, request routing, backpressure, warm prefixes.

The server talks to an `EnginePool`, never to an engine directly; with one engine the pool
only adds admission control. Each request goes to one engine and stays there.

- Devices: every CUDA GPU when ENABLE_MULTI_DEVICE=1 (or the DEVICES list, or NUM_ENGINES
  engines on the configured device, which lets a CPU host several engines).
- Routing (SCHEDULER_MODE): `rr`, `random`, `fsfs` (fewest sequences in flight) and
  `cache_aware`. The pool keeps, per engine, an approximate record of the prompts it routed
  there (chained hashes of 16-token blocks, LRU-bounded), the router-side picture of that
  engine's radix cache, as SGLang's router does. cache_aware sends a request to the engine
  holding the longest share of its prompt when that share reaches CACHE_AWARE_THRESHOLD, else
  to the least-loaded engine, and always to the least-loaded one while loads are too uneven
  (the busiest engine more than BALANCE_ABS_THRESHOLD sequences and BALANCE_REL_THRESHOLD
  times above the idlest).
- Processes (ENGINE_PROCESSES): a pool of several CUDA engines runs each in its own worker
  process (`engine.worker.ProcessEngine`) so their loops do not share one GIL.
- Backpressure: MAX_INFLIGHT_TOTAL and MAX_INFLIGHT_PER_ENGINE cap the sequences in flight
  (0 = no cap); beyond them `admit` waits in a FIFO of at most MAX_QUEUE requests for at most
  QUEUE_TIMEOUT_S, then raises `PoolBusy` (the server's 429 with Retry-After).
- ADAPTIVE_MAX_NEW_TOKENS: while the pool is loaded past ADAPTIVE_LOAD_THRESHOLD of its
  capacity, `adapt_max_tokens` scales max_tokens by ADAPTIVE_FACTOR (the response says so).
- WARM_PREFIXES (`p1||p2`) go into every engine's radix cache at start-up; `warm()` queues
  prefixes that a background thread inserts later (ASYNC_PREFILL_QUEUE), skipping any that
  an engine already holds or that a live request is computing.
- Rolling latency and throughput over METRIC_WINDOW seconds, per engine and in total.
- An engine whose loop thread has died leaves the rotation; its requests end with a 503
  error, the others are served on, and `health()` reports the pool as degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backend.factory import create_engine
from config import Config, ConfigError, get_config, resolve_device
from engine.base import PREFIX_PARAMS, SNAPSHOT_GAUGES, EngineBase, GenerateOutput, Prompt
from engine.request import Sink, StreamDelta, Usage
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ROUTING_MODES = ("rr", "random", "fsfs", "cache_aware")
PREFIX_BLOCK = 16  # tokens per hashed block of the router's prefix records
PREFIX_INDEX_BLOCKS = 1 << 20  # blocks remembered per engine (LRU beyond)
WATCHDOG_PERIOD_S = 0.25
WARM_SEPARATOR = "||"


class PoolBusy(Exception):
    """No engine can take the request now and the queue is full or the wait timed out."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PoolDown(Exception):
    """No engine of the pool is alive."""


def pool_devices(config: Config) -> list[str]:
    """One device name per engine: DEVICES, else every CUDA GPU under ENABLE_MULTI_DEVICE,
    else NUM_ENGINES (at least 1) engines on DEVICE."""
    if config.devices:
        return [d.strip() for d in config.devices.split(",") if d.strip()]
    if config.enable_multi_device and torch.cuda.is_available() and config.device in (
        "auto", "cuda"
    ):
        count = config.num_engines or torch.cuda.device_count()
        if count > torch.cuda.device_count():
            raise ConfigError(f"NUM_ENGINES={count} but only {torch.cuda.device_count()} GPUs")
        return [f"cuda:{i}" for i in range(count)]
    if config.enable_multi_device and not config.num_engines:
        logger.warning("ENABLE_MULTI_DEVICE=1 without CUDA GPUs for DEVICE=%s: one engine "
                       "(NUM_ENGINES or DEVICES set more)", config.device)
    return [config.device] * max(1, config.num_engines)


def use_processes(config: Config, devices: Sequence[str]) -> bool:
    """ENGINE_PROCESSES: whether each engine runs in its own worker process (auto: more
    than one engine, all on CUDA)."""
    if config.engine_processes != "auto":
        return config.engine_processes == "1"
    return len(devices) > 1 and all(resolve_device(d).type == "cuda" for d in devices)


def build_engines(config: Config) -> list[EngineBase]:
    """The pool's engines, one per `pool_devices` entry, each built from `config` with its
    own device (and its own seed offset, so sampling noise differs between engines); the
    engine type follows BACKEND_IMPL (`create_engine`), in this process or, under
    ENGINE_PROCESSES, each in a worker process (all started at once)."""
    devices = pool_devices(config)
    configs = [replace(config, device=device, seed=config.seed + i)
               for i, device in enumerate(devices)]
    if not use_processes(config, devices):
        return [create_engine(c) for c in configs]
    from engine.worker import start_workers

    return list(start_workers(configs))


class PrefixIndex:
    """Which prompt prefixes an engine has seen, at PREFIX_BLOCK-token granularity."""

    def __init__(self, max_blocks: int = PREFIX_INDEX_BLOCKS) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._max_blocks = max_blocks

    @staticmethod
    def hashes(ids: Sequence[int]) -> list[int]:
        """Chained hashes of each whole block: hash i covers tokens [0, (i + 1) * block)."""
        out: list[int] = []
        chained = 0
        for start in range(0, len(ids) - len(ids) % PREFIX_BLOCK, PREFIX_BLOCK):
            chained = hash((chained, tuple(ids[start : start + PREFIX_BLOCK])))
            out.append(chained)
        return out

    def match(self, hashes: Sequence[int]) -> int:
        """Tokens of the longest recorded prefix."""
        blocks = 0
        for h in hashes:
            if h not in self._blocks:
                break
            blocks += 1
        return blocks * PREFIX_BLOCK

    def insert(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)

    def remove(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._blocks.pop(h, None)

    def __len__(self) -> int:
        return len(self._blocks)


class RollingWindow:
    """Finished requests of the last `seconds`: throughput and latency."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._events: deque[tuple[float, float, int]] = deque()  # (finished at, latency, tokens)
        self._lock = threading.Lock()

    def record(self, latency_s: float, tokens: int, now: float | None = None) -> None:
        now = now or time.monotonic()
        with self._lock:
            self._events.append((now, latency_s, tokens))
            self._trim(now)  # bounded by the window even if nobody reads it

    def summary(self, now: float | None = None) -> dict[str, float | int | None]:
        now = now or time.monotonic()
        with self._lock:
            self._trim(now)
            events = list(self._events)
        latencies = sorted(e[1] for e in events)
        tokens = sum(e[2] for e in events)
        return {
            "window_s": self.seconds,
            "requests": len(events),
            "output_tokens_per_s": tokens / self.seconds,
            "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
            "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        }

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.seconds:
            self._events.popleft()


@dataclass(eq=False)
class EngineSlot:
    """One engine of the pool and the pool's bookkeeping of it."""

    index: int
    engine: EngineBase
    window: RollingWindow
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)
    in_flight: int = 0  # sequences routed here and not finished
    alive: bool = True
    requests: dict[str, _Routed] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)  # the last snapshot's counters


@dataclass(eq=False)
class _Routed:
    """A request on an engine: its sink and the sequences that have not finished."""

    sink: Sink
    pending: set[int]
    weight: int
    started: float
    tokens: int = 0
    failed: bool = False  # its sink raised: no more deltas go to it


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[EngineSlot]
    ids: list[int]
    hashes: list[int]
    weight: int


class EnginePool:
    """Several engines behind the Engine surface the server uses, plus admission."""

    def __init__(self, config: Config | None = None,
                 engines: list[EngineBase] | None = None) -> None:
        self.config = config or get_config()
        if self.config.scheduler_mode not in ROUTING_MODES:
            raise ConfigError(f"SCHEDULER_MODE must be one of {', '.join(ROUTING_MODES)}")
        built = engines if engines is not None else build_engines(self.config)
        if not built:
            raise ConfigError("the engine pool needs at least one engine")
        window = self.config.metric_window_s
        self.slots = [EngineSlot(i, e, RollingWindow(window)) for i, e in enumerate(built)]
        self._lock = threading.RLock()
        self._rr = itertools.count()
        self._random = random.Random(self.config.seed)
        self._waiters: deque[_Waiter] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._total = 0
        self._rid_slot: dict[str, EngineSlot] = {}
        self._stopped = threading.Event()
        self._warm_queue: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self.warm_stats = {"queued": 0, "inserted": 0, "skipped": 0, "failed": 0}
        self._threads = [threading.Thread(target=self._watch, name="pool-watchdog", daemon=True)]
        if self.config.async_prefill_queue:
            self._threads.append(
                threading.Thread(target=self._warm_worker, name="pool-warm", daemon=True))
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------- the engine surface
    @property
    def first(self) -> EngineBase:
        return self.slots[0].engine

    @property
    def tokenizer(self) -> Any:
        return self.first.tokenizer

    @property
    def model_name(self) -> str:
        return self.first.model_name

    @property
    def source(self) -> Any:
        return self.first.source

    @property
    def max_context_len(self) -> int:
        return self.first.max_context_len

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """InvalidRequestError for a request some engine could not serve, before it is
        routed (a refused prompt neither waits in the queue nor counts as held by an engine);
        any engine may be picked, so the smallest one's KV cache bounds it."""
        self.first.check_params(params)
        for slot in self.live_slots() or self.slots[:1]:
            slot.engine.check_fits(ids, params)

    def tokenize(self, prompt: Prompt) -> list[int]:
        return self.first.tokenize(prompt)

    def warmup(self) -> None:
        """Warm every engine up, then insert WARM_PREFIXES into all of them."""
        for slot in self.slots:
            slot.engine.warmup()
        for prefix in self.warm_prefixes():
            self.insert_prefix(prefix)

    def warm_prefixes(self) -> list[str]:
        """WARM_PREFIXES split at ||, each without the spaces around it (a leading space
        would tokenize unlike the prompts it should match)."""
        return [p.strip() for p in self.config.warm_prefixes.split(WARM_SEPARATOR) if p.strip()]

    def shutdown(self) -> None:
        """Stop the engines; a request still open on one ends with a 503 error."""
        self._stopped.set()
        self._warm_queue.put(None)
        for slot in self.slots:
            slot.engine.shutdown()
            if slot.alive:
                self._take_out(slot, "the server is shutting down; retry the request")

    def live_slots(self) -> list[EngineSlot]:
        """Engines in rotation whose loop (or worker) still runs: one that just stopped is
        skipped before the watchdog takes it out."""
        return [s for s in self.slots if s.alive and s.engine.alive]

    def insert_prefix(self, prompt: Prompt) -> int:
        """Cache `prompt` in every live engine; returns the tokens inserted per engine."""
        ids = self.tokenize(prompt)
        hashes = PrefixIndex.hashes(ids)
        inserted = 0
        for slot in self.live_slots():
            inserted = slot.engine.insert_prefix(ids)
            with self._lock:
                slot.prefixes.insert(hashes)
        return inserted

    def flush_cache(self) -> int:
        """Drop every engine's unreferenced cached prefixes (and the router's records)."""
        freed = 0
        for slot in self.live_slots():
            freed += slot.engine.flush_cache()
            with self._lock:
                slot.prefixes = PrefixIndex()
        return freed

    def health(self) -> dict[str, Any]:
        live = len(self.live_slots())
        status = "ok" if live == len(self.slots) else ("degraded" if live else "failed")
        return {"status": status, "engines": [
            {"engine": s.index, "device": s.engine.device_name, "alive": s.alive}
            for s in self.slots]}

    def snapshot(self) -> dict[str, Any]:
        """Engine gauges summed over live engines and counters over all of them (a stopped
        engine keeps the counts it last reported, so totals never go down), plus each
        engine's own view."""
        per_engine = []
        totals: dict[str, float] = {}
        windows = [slot.window.summary() for slot in self.slots]
        for slot, window in zip(self.slots, windows, strict=True):
            view: dict[str, Any] = {"engine": slot.index, "alive": slot.alive,
                                    "in_flight": slot.in_flight, "window": window}
            if slot.alive:
                snap = slot.engine.snapshot()
                view.update(snap)
                numbers = {key: value for key, value in snap.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)}
                slot.counts = {key: value for key, value in numbers.items()
                               if key not in SNAPSHOT_GAUGES}
            else:
                numbers = slot.counts
                view.update(numbers)
            for key, value in numbers.items():
                totals[key] = totals.get(key, 0) + value
            per_engine.append(view)
        if "kv_total_slots" in totals and totals["kv_total_slots"]:
            totals["kv_usage"] = totals.get("kv_used_slots", 0) / totals["kv_total_slots"]
        return {**totals, "engines": per_engine, "pool": {
            "num_engines": len(self.slots), "live_engines": len(self.live_slots()),
            "in_flight": self._total, "queued": len(self._waiters),
            "scheduler_mode": self.config.scheduler_mode,
            "window": self._total_window(windows),
            "warm": dict(self.warm_stats)}}

    def _total_window(
        self, views: list[dict[str, float | int | None]]
    ) -> dict[str, float | int | None]:
        requests = sum(int(v["requests"] or 0) for v in views)
        weighted = [(v["latency_mean_s"], v["requests"]) for v in views if v["requests"]]
        return {
            "window_s": self.config.metric_window_s,
            "requests": requests,
            "output_tokens_per_s": sum(float(v["output_tokens_per_s"] or 0) for v in views),
            "latency_mean_s": (sum(float(m or 0) * int(n or 0) for m, n in weighted) / requests
                               if requests else None),
        }

    # --------------------------------------------------------------- routing
    def _capacity(self) -> int:
        per_engine = self.config.max_inflight_per_engine * len(self.live_slots())
        caps = [c for c in (self.config.max_inflight_total, per_engine) if c > 0]
        return min(caps) if caps else 0

    def load(self) -> float:
        """Sequences in flight over the pool's capacity (0 when uncapped)."""
        capacity = self._capacity()
        return self._total / capacity if capacity else 0.0

    def adapt_max_tokens(self, max_tokens: int, prompt_len: int) -> int:
        """ADAPTIVE_MAX_NEW_TOKENS: `max_tokens` scaled down while the pool is loaded. A
        request past the context is left as it is, to be refused as it would be unloaded."""
        config = self.config
        if (not config.adaptive_max_new_tokens or self.load() < config.adaptive_load_threshold
                or prompt_len + max_tokens > self.max_context_len):
            return max_tokens
        return max(1, int(max_tokens * config.adaptive_factor))

    def _fits(self, slot: EngineSlot, weight: int) -> bool:
        cap = self.config.max_inflight_per_engine
        return not cap or slot.in_flight == 0 or slot.in_flight + weight <= cap

    def _total_fits(self, weight: int) -> bool:
        cap = self.config.max_inflight_total
        return not cap or self._total == 0 or self._total + weight <= cap

    def _choose(self, candidates: list[EngineSlot], ids: list[int],
                hashes: list[int]) -> EngineSlot:
        mode = self.config.scheduler_mode
        if mode == "rr":
            return candidates[next(self._rr) % len(candidates)]
        if mode == "random":
            return self._random.choice(candidates)
        least = min(candidates, key=lambda s: (s.in_flight, s.index))
        if mode == "fsfs":
            return least
        loads = [s.in_flight for s in self.live_slots()]
        busiest, idlest = max(loads), min(loads)
        if (busiest - idlest > self.config.balance_abs_threshold
                and busiest > idlest * self.config.balance_rel_threshold):
            return least
        best = max(candidates, key=lambda s: (s.prefixes.match(hashes), -s.in_flight))
        matched = best.prefixes.match(hashes)
        if ids and matched / len(ids) >= self.config.cache_aware_threshold:
            return best
        return least

    def _try_place(self, ids: list[int], hashes: list[int], weight: int,
                   capped: bool = True) -> EngineSlot | None:
        """Reserve `weight` sequences on the engine the mode picks among those with room
        (all live ones when not `capped`); None when the caps leave no room."""
        with self._lock:
            live = self.live_slots()
            if not live:
                raise PoolDown("no engine of the pool is running")
            candidates = live
            if capped:
                if not self._total_fits(weight):
                    return None
                candidates = [s for s in live if self._fits(s, weight)]
                if not candidates:
                    return None
            slot = self._choose(candidates, ids, hashes)
            slot.in_flight += weight
            self._total += weight
            slot.prefixes.insert(hashes)
            return slot

    def route(self, ids: list[int], weight: int = 1) -> EngineSlot:
        """Place a request now, ignoring the caps (in-process use: offline runs, warming)."""
        slot = self._try_place(ids, PrefixIndex.hashes(ids), weight, capped=False)
        assert slot is not None
        return slot

    async def admit(self, ids: list[int], weight: int = 1) -> EngineSlot:
        """The engine for a request of `weight` sequences, waiting in FIFO order for room.

        Raises PoolBusy when the queue is full or the wait exceeds QUEUE_TIMEOUT_S, PoolDown
        when no engine is alive. The reservation is released as the sequences finish."""
        self._loop = asyncio.get_running_loop()
        hashes = PrefixIndex.hashes(ids)
        if not self._waiters:
            slot = self._try_place(ids, hashes, weight)
            if slot is not None:
                return slot
        retry = max(1, int(self.config.queue_timeout_s) or 1)
        if len(self._waiters) >= self.config.max_queue:
            raise PoolBusy(f"the server is busy ({self._total} sequences in flight, "
                           f"{len(self._waiters)} queued); retry later", retry)
        waiter = _Waiter(self._loop.create_future(), ids, hashes, weight)
        self._waiters.append(waiter)
        placed = False
        try:
            try:
                slot = await asyncio.wait_for(asyncio.shield(waiter.future),
                                              self.config.queue_timeout_s)
            except asyncio.TimeoutError:
                if not (waiter.future.done() and not waiter.future.cancelled()):
                    raise PoolBusy(
                        f"no capacity within {self.config.queue_timeout_s:g} s "
                        f"({self._total} sequences in flight); retry later", retry) from None
                slot = waiter.future.result()  # placed just as the wait ran out
            placed = True
            return slot
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._dispatch()  # a head that could not fit may have blocked smaller ones
            future = waiter.future
            if not placed and future.done() and not future.cancelled() and \
                    future.exception() is None:
                self._release(future.result(), weight)  # the caller left (client gone)

    def cancel(self, slot: EngineSlot, weight: int) -> None:
        """Give back a reservation that was never submitted."""
        self._release(slot, weight)

    def _release(self, slot: EngineSlot, weight: int) -> None:
        with self._lock:
            slot.in_flight -= weight
            self._total -= weight
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        """On the event loop: hand freed room to the waiters, first come first served."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            try:
                slot = self._try_place(head.ids, head.hashes, head.weight)
            except PoolDown as exc:
                self._waiters.popleft()
                head.future.set_exception(exc)
                continue
            if slot is None:
                return
            self._waiters.popleft()
            head.future.set_result(slot)

    # ------------------------------------------------------------ requests
    def submit(self, ids: list[int], params: SamplingParams, sink: Sink,
               rid: str | None = None, slot: EngineSlot | None = None) -> str:
        """Submit to `slot` (from `admit`), or to the engine `route` picks; returns the id."""
        slot = slot or self.route(ids, params.n)
        rid = rid or uuid.uuid4().hex
        routed = _Routed(sink, set(range(params.n)), params.n, time.monotonic())
        target = slot

        def pool_sink(delta: StreamDelta) -> None:
            self._on_delta(target, delta.rid, routed, delta)

        with self._lock:  # registered first: the engine may answer before submit returns
            if not slot.alive:  # taken out since it was chosen: its requests were failed
                self._release(slot, params.n)
                raise PoolDown(f"engine {slot.index} of the pool stopped; retry the request")
            slot.requests[rid] = routed
            self._rid_slot[rid] = slot
        try:
            slot.engine.submit(ids, params, pool_sink, rid=rid)
        except BaseException as exc:
            with self._lock:
                mine = slot.requests.pop(rid, None) is routed
                if mine:
                    self._rid_slot.pop(rid, None)
            if not mine:  # taken out meanwhile: its sink has the 503, its place is released
                return rid
            self._release(slot, params.n)
            if isinstance(exc, RuntimeError) and not slot.engine.alive:
                raise PoolDown(f"engine {slot.index} of the pool stopped; retry the "
                               "request") from exc
            raise
        return rid

    def _on_delta(self, slot: EngineSlot, rid: str, routed: _Routed, delta: StreamDelta) -> None:
        routed.tokens += len(delta.token_ids)
        last = False
        with self._lock:
            if delta.finished and delta.index in routed.pending:
                routed.pending.discard(delta.index)
                last = not routed.pending
                if last:
                    slot.requests.pop(rid, None)
                    self._rid_slot.pop(rid, None)
        if last:  # its place goes back before its consumer hears the end (and may answer)
            slot.window.record(time.monotonic() - routed.started, routed.tokens)
            self._release(slot, routed.weight)
        if not routed.failed:
            try:
                routed.sink(delta)
            except Exception:  # its consumer is gone: the request ends, its place goes back
                logger.exception("the consumer of request %s failed; aborting it", rid)
                routed.failed = True
                if not last:
                    slot.engine.abort(rid)

    def abort(self, rid: str) -> None:
        with self._lock:
            slot = self._rid_slot.get(rid)
        if slot is not None:
            slot.engine.abort(rid)

    def generate(self, prompts: Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[list[GenerateOutput]]:
        """Offline generation through the pool (each prompt routed; no caps)."""
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        results: list[dict[int, GenerateOutput]] = [{} for _ in prompts]
        done = threading.Semaphore(0)
        expected = 0
        for number, (prompt, p) in enumerate(zip(prompts, all_params, strict=True)):
            ids = self.tokenize(prompt)
            texts: dict[int, list[StreamDelta]] = {}

            def sink(delta: StreamDelta, number: int = number,
                     texts: dict[int, list[StreamDelta]] = texts) -> None:
                texts.setdefault(delta.index, []).append(delta)
                if delta.finished:
                    results[number][delta.index] = _merge(texts[delta.index])
                    done.release()

            self.submit(ids, p, sink)
            expected += p.n
        for _ in range(expected):
            done.acquire()
        return [[r[i] for i in sorted(r)] for r in results]

    # ------------------------------------------------------------- warming
    def warm(self, prompt: Prompt) -> bool:
        """Queue `prompt` for the background warmer (ASYNC_PREFILL_QUEUE); False when the
        queue is off."""
        if not self.config.async_prefill_queue:
            return False
        ids = self.tokenize(prompt)
        self.check(ids, PREFIX_PARAMS)  # a prompt no engine could hold is refused now
        self.warm_stats["queued"] += 1
        self._warm_queue.put(ids)
        return True

    def _warm_worker(self) -> None:
        while not self._stopped.is_set():
            prompt = self._warm_queue.get()
            if prompt is None:
                return
            try:
                self._warm_one(prompt)
            except Exception:
                logger.exception("warming a prefix failed")

    def _warm_one(self, ids: list[int]) -> None:
        hashes = PrefixIndex.hashes(ids)
        whole = len(ids) - len(ids) % PREFIX_BLOCK  # the router sees whole blocks only
        with self._lock:  # one section: a live request cannot slip in between
            live = self.live_slots()
            held = any(s.prefixes.match(hashes) >= whole for s in live)
            # shorter than a block: nothing worth warming, and the router could not tell
            # whether a live request computes it already
            if not whole or held or not live:
                self.warm_stats["skipped"] += 1
                return
            slot = min(live, key=lambda s: (s.in_flight, s.index))
            new = hashes[slot.prefixes.match(hashes) // PREFIX_BLOCK :]
            slot.prefixes.insert(hashes)  # recorded first: live requests sharing it now go
        try:  # to this engine, which computes it once for both
            slot.engine.insert_prefix(ids)
        except Exception:
            with self._lock:  # the router must not send requests for what is not there
                slot.prefixes.remove(new)
                self.warm_stats["failed"] += 1
            raise
        self.warm_stats["inserted"] += 1

    # ------------------------------------------------------------ liveness
    def _watch(self) -> None:
        while not self._stopped.wait(WATCHDOG_PERIOD_S):
            for slot in self.slots:
                if slot.alive and not slot.engine.alive and not self._stopped.is_set():
                    self._take_out(slot)

    def _take_out(self, slot: EngineSlot, message: str = "") -> None:
        """Out of rotation; every request still on it ends with a 503 error (`message`, or
        that its engine stopped)."""
        if not message:
            logger.error("engine %d stopped; taking it out of the pool", slot.index)
            message = f"engine {slot.index} of the pool stopped; retry the request"
        with self._lock:
            slot.alive = False
            stranded = list(slot.requests.items())
        for rid, routed in stranded:
            for index in sorted(routed.pending):
                usage = Usage(0, 0, 0)
                try:
                    self._on_delta(slot, rid, routed, StreamDelta(
                        rid, index, "", [], finish_reason="abort", usage=usage, error=message,
                        error_status=503))
                except Exception:  # a failing sink must not stop the watchdog
                    logger.exception("failing request %s of a stopped engine", rid)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._dispatch)


def _merge(deltas: list[StreamDelta]) -> GenerateOutput:
    last = deltas[-1]
    return GenerateOutput(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(0, 0, 0),
        index=last.index,
        logprobs=[lp for d in deltas for lp in (d.logprobs or [])],
    )


AnyEngine = EngineBase | EnginePool  # what in-process callers (benchmarks, scripts) may drive
