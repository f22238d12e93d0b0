"""ProcessEngine: an engine in its own worker process, behind the engine surface.

Several engines in one process share one GIL: each spends milliseconds of Python per step
(scheduling, sampling bookkeeping, detokenizing, sinks), so two engine loops on two GPUs
mostly wait for each other. A pool of several CUDA engines therefore runs each engine in
its own process (ENGINE_PROCESSES), as SGLang and vLLM do.

- The parent keeps the tokenizer only: it tokenizes and validates every request
  (`EngineBase.prepare`), so a bad request fails synchronously exactly as in-process. It
  keeps each open request's sink and sends commands over a pipe.
- The worker (spawned: CUDA needs it) builds the real engine with `create_engine` on its
  device and reports its model facts; the parent's constructor waits for that (a start-up
  error is raised in the parent with the worker's message).
- After every turn of the engine's loop the worker sends all the deltas of that turn in one
  message, with a snapshot at most every SNAPSHOT_PERIOD_S and whenever the engine goes
  idle; a reader thread in the parent hands the deltas to their sinks.
- A worker that dies (killed, crashed) ends every open request with a 503 error delta, then
  `alive` turns False (the pool takes the engine out of rotation).
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import multiprocessing
import operator
import queue
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from backend.batch import ModelInfo
from backend.loader import ModelSource, resolve_model
from config import Config, configure_logging
from engine.base import EngineBase, Prompt
from engine.request import Sink, StreamDelta, Usage
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

SNAPSHOT_PERIOD_S = 0.1
STOP_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 120.0
WARMUP_TIMEOUT_S = 900.0  # first kernel compiles on a fresh GPU included
WATCH_PERIOD_S = 0.25  # how often an idle worker checks that its engine loop runs
CALLS = ("flush_cache", "warmup")  # engine methods the parent may run in the worker
# deltas cross the pipe as plain tuples of their fields: pickling a step's worth of
# dataclass instances cost ~5x more, on the worker's engine loop thread
_DELTA_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(StreamDelta)))


@dataclass
class WorkerReady:
    """What the worker reports once its engine is built."""

    info: ModelInfo
    eos_ids: frozenset[int]
    max_context_len: int
    kv_capacity: int | None
    device_name: str
    snapshot: dict[str, Any]


@dataclass(eq=False)
class _Open:
    """An open request in the parent: its sink and the indices of its unfinished sequences."""

    sink: Sink
    remaining: set[int]


class ProcessEngine(EngineBase):
    """The engine surface over an engine running in a worker process."""

    def __init__(self, config: Config | None = None, *, source: ModelSource | None = None,
                 wait: bool = True) -> None:
        super().__init__(config, source=source)
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()  # guards _open and _closing
        self._send_lock = threading.Lock()  # one writer on the pipe at a time
        self._closing = False
        self._pipe_broken = False  # a write failed: the worker is gone, its EOF may lag
        self._dead = threading.Event()
        self._ready: queue.SimpleQueue[WorkerReady | BaseException] = queue.SimpleQueue()
        self._results: dict[int, queue.SimpleQueue[tuple[bool, Any]]] = {}
        self._call_ids = itertools.count()
        self._snapshot: dict[str, Any] = {}
        self._started = False
        self._device_name = self.config.device
        self._capacity: int | None = None
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child, self.config, self.source),
            name=f"minisgl-engine-{self.config.device}", daemon=True)
        self._process.start()
        child.close()  # the worker's end: closed here so its death reads as EOF
        self._reader = threading.Thread(target=self._read, name="minisgl-worker-reader",
                                        daemon=True)
        self._reader.start()
        _LIVE.add(self)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the worker's engine is built; raise its start-up error if it failed."""
        if self._started:
            return
        ready = self._ready.get()
        if isinstance(ready, BaseException):
            self.shutdown()
            raise ready
        self.info = ready.info
        self.eos_ids = ready.eos_ids
        self.max_context_len = ready.max_context_len
        self._capacity = ready.kv_capacity
        self._device_name = ready.device_name
        self._snapshot = ready.snapshot
        self._started = True
        logger.info("engine worker %d ready on %s", self._process.pid, self._device_name)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ------------------------------------------------------------- public API
    @property
    def device_name(self) -> str:
        return self._device_name

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        from backend.factory import resolve_backend

        if resolve_backend(self.config) == "mlx":
            from backend.mlx.sampling import check_supported

            check_supported(params)

    def _kv_capacity(self) -> int | None:
        return self._capacity

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Sink,
               rid: str | None = None) -> str:
        """Validate here, then queue the request in the worker; `sink` gets its deltas from
        the reader thread."""
        ids = self.prepare(prompt, params)
        rid = rid or uuid.uuid4().hex
        with self._lock:  # registered first: the worker may answer before submit returns
            if self._closing:
                raise RuntimeError(f"the engine worker on {self.device_name} has stopped")
            self._open[rid] = _Open(sink, set(range(params.n)))
        if not self._send(("submit", (rid, ids, params))):
            with self._lock:
                unanswered = self._open.pop(rid, None) is not None
            if unanswered:  # (else the worker's exit has failed it through its sink)
                raise RuntimeError(f"the engine worker on {self.device_name} has stopped")
        return rid

    def submit_many(
        self, requests: Sequence[tuple[Prompt, SamplingParams, Sink, str | None]]
    ) -> list[str]:
        """All validated first (a bad one queues none), then one `submit` each: every
        request reaches the worker in its own message."""
        for prompt, params, _, _ in requests:
            self.prepare(prompt, params)
        return [self.submit(*request) for request in requests]

    def abort(self, rid: str) -> None:
        self._send(("abort", rid))

    def snapshot(self) -> dict[str, Any]:
        """The worker's latest snapshot (at most SNAPSHOT_PERIOD_S old while it works)."""
        return dict(self._snapshot)

    def flush_cache(self) -> int:
        return int(self._call("flush_cache"))

    def warmup(self) -> None:
        """The worker engine's own warm-up, in the worker (its kernels compile there)."""
        self._call("warmup", WARMUP_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        """False once the worker has stopped (its open requests failed first) or a write to
        it failed (it is gone; the pool fails its requests)."""
        return (self._started and not self._dead.is_set() and not self._closing
                and not self._pipe_broken)

    @property
    def open_requests(self) -> int:
        """Requests whose sinks the parent still holds."""
        with self._lock:
            return len(self._open)

    def shutdown(self) -> None:
        """Stop the worker (killed after STOP_TIMEOUT_S) and wait for the reader."""
        _LIVE.discard(self)
        self._stopped.set()
        self._send(("stop", None))
        self._process.join(timeout=STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("engine worker %s did not stop; killing it", self._process.pid)
            self._process.kill()
            self._process.join(timeout=STOP_TIMEOUT_S)
        self._reader.join(timeout=STOP_TIMEOUT_S)
        self._conn.close()

    # ------------------------------------------------------------- plumbing
    def _send(self, message: tuple[str, Any]) -> bool:
        """Write to the worker under its own lock: never under `_lock`, which the reader
        needs for every delta (a full pipe must not stop the reader draining the other)."""
        if self._closing:
            return False
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                self._pipe_broken = True
                return False
        return True

    def _call(self, name: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        call_id = next(self._call_ids)
        result: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._results[call_id] = result
        try:
            if not self._send(("call", (call_id, name))):
                raise RuntimeError(f"the engine worker on {self.device_name} has stopped")
            ok, value = result.get(timeout=timeout_s)
        finally:
            self._results.pop(call_id, None)
        if not ok:
            raise value
        return value

    def _read(self) -> None:
        """The reader thread: the worker's messages, until its end of the pipe closes."""
        try:
            while True:
                kind, payload = self._conn.recv()
                self._dispatch(kind, payload)
        except (EOFError, OSError):
            pass
        except Exception:
            logger.exception("engine worker reader failed")
        self._on_exit()

    def _dispatch(self, kind: str, payload: Any) -> None:
        if kind == "deltas":
            deltas, snapshot = payload
            if snapshot is not None:
                self._snapshot = snapshot
            for fields in deltas:
                self._deliver_delta(StreamDelta(*fields))
        elif kind == "result":
            call_id, ok, value = payload
            waiting = self._results.get(call_id)
            if waiting is not None:
                waiting.put((ok, value))
        elif kind == "ready":
            self._ready.put(payload)
        elif kind == "failed":
            self._ready.put(RuntimeError(payload))

    def _deliver_delta(self, delta: StreamDelta) -> None:
        with self._lock:
            entry = self._open.get(delta.rid)
            if entry is None:
                return
            if delta.finished:
                entry.remaining.discard(delta.index)
                if not entry.remaining:
                    del self._open[delta.rid]
        try:
            entry.sink(delta)
        except Exception:  # one failing sink must not stop the others' streams
            logger.exception("the sink of request %s failed", delta.rid)

    def _on_exit(self) -> None:
        """The worker is gone: fail every open request, then report the engine dead."""
        with self._lock:
            self._closing = True
            stranded = list(self._open.items())
            self._open.clear()
        if not self._stopped.is_set():
            self._process.join(timeout=1.0)
            logger.error("engine worker %s on %s exited (code %s); failing %d requests",
                         self._process.pid, self._device_name,
                         self._process.exitcode, len(stranded))
        message = "the engine worker stopped; retry the request"
        for rid, entry in stranded:
            for index in sorted(entry.remaining):
                try:
                    entry.sink(StreamDelta(rid, index, "", [], finish_reason="abort",
                                           usage=Usage(0, 0, 0), error=message,
                                           error_status=503))
                except Exception:
                    logger.exception("failing request %s of a stopped worker", rid)
        for waiting in list(self._results.values()):
            waiting.put((False, RuntimeError(message)))
        self._ready.put(RuntimeError("the engine worker exited during start-up"))
        self._dead.set()


def start_workers(configs: list[Config]) -> list[ProcessEngine]:
    """One ProcessEngine per config, their workers starting side by side; if one fails,
    the others are stopped and its error raised."""
    source = resolve_model(configs[0]) if configs else None
    engines: list[ProcessEngine] = []
    try:
        for config in configs:
            engines.append(ProcessEngine(config, source=source, wait=False))
        for engine in engines:
            engine.wait_ready()
    except BaseException:
        for engine in engines:
            engine.shutdown()
        raise
    return engines


# ---------------------------------------------------------------- the worker process
class _Outbox:
    """The worker's side of the pipe: deltas gathered over one turn of the engine loop and
    sent in one message (with a snapshot now and then)."""

    def __init__(self, conn: Connection, engine: EngineBase) -> None:
        self.conn = conn
        self.engine = engine
        self.lock = threading.Lock()
        self.deltas: list[StreamDelta] = []
        self.last_snapshot = 0.0
        self.idle_sent = True

    def sink(self, delta: StreamDelta) -> None:
        self.deltas.append(delta)

    def flush(self) -> None:
        """After a turn of the loop (loop thread): send its deltas and maybe a snapshot."""
        now = time.monotonic()
        idle = not self.engine.busy
        if self.deltas or not idle:
            self.idle_sent = False  # work happened: the first idle turn reports it
        due = now - self.last_snapshot >= SNAPSHOT_PERIOD_S or (idle and not self.idle_sent)
        if not self.deltas and not due:
            return
        deltas, self.deltas = self.deltas, []
        snapshot = None
        if due:
            snapshot = self.engine.snapshot()
            self.last_snapshot = now
            self.idle_sent = idle
        self.send_deltas(deltas, snapshot)

    def send_deltas(self, deltas: list[StreamDelta], snapshot: Any = None) -> None:
        self.send(("deltas", ([_DELTA_FIELDS(d) for d in deltas], snapshot)))

    def send(self, message: tuple[str, Any]) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the parent is gone: the command loop sees EOF
                logger.debug("engine worker could not send %s", message[0])


def _worker_main(conn: Connection, config: Config, source: ModelSource) -> None:
    """The worker process: build the engine, report, then serve commands until told to stop
    or the parent goes away."""
    configure_logging(config)
    # Ctrl-C or a SIGTERM to the whole process group reaches the workers too: they stop on
    # the parent's "stop" (or its pipe's end), so that its graceful shutdown can finish
    # the requests still streaming.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from backend.factory import create_engine

    try:
        engine = create_engine(config, source=source)
    except BaseException as exc:
        logger.exception("engine worker start-up failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    outbox = _Outbox(conn, engine)
    engine.add_turn_hook(outbox.flush)
    outbox.send(("ready", WorkerReady(
        engine.info, engine.eos_ids, engine.max_context_len, engine._kv_capacity(),
        engine.device_name, engine.snapshot())))
    try:
        _serve(conn, engine, outbox)
    finally:
        engine.shutdown()
        conn.close()


def _serve(conn: Connection, engine: EngineBase, outbox: _Outbox) -> None:
    """Commands from the parent, until "stop", the parent's exit, or the engine loop's death
    (the worker then exits, which the parent reads as the engine stopping)."""
    while engine.alive:
        try:
            if not conn.poll(WATCH_PERIOD_S):
                continue
            kind, payload = conn.recv()
        except (EOFError, OSError):
            logger.warning("the parent of engine worker went away; stopping")
            return
        if kind == "stop":
            return
        if kind == "submit":
            _submit(engine, outbox, *payload)
        elif kind == "abort":
            engine.abort(payload)
        elif kind == "call":
            call_id, name = payload
            try:
                if name not in CALLS:
                    raise ValueError(f"unknown engine call {name!r}")
                value = getattr(engine, name)()
                # the parent reads in order: its snapshot is current when the caller wakes
                outbox.send_deltas([], engine.snapshot())
                outbox.send(("result", (call_id, True, value)))
            except Exception as exc:
                outbox.send(("result", (call_id, False, exc)))
    if not engine.alive:
        logger.error("the engine loop stopped; engine worker exiting")


def _submit(engine: EngineBase, outbox: _Outbox, rid: str, ids: list[int],
            params: SamplingParams) -> None:
    """Queue a request the parent validated; one it could not (the worker disagrees) ends
    with an error delta per sequence."""
    try:
        engine.submit(ids, params, outbox.sink, rid=rid)
    except InvalidRequestError as exc:
        failed = [StreamDelta(rid, i, "", [], finish_reason="abort", usage=Usage(0, 0, 0),
                              error=str(exc), error_status=400) for i in range(params.n)]
        outbox.send_deltas(failed)


# ---------------------------------------------------------------- interpreter exit
_LIVE: weakref.WeakSet[ProcessEngine] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    for engine in list(_LIVE):
        try:
            engine.shutdown()
        except Exception:
            logger.exception("stopping an engine worker at exit failed")
