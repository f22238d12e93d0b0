"""/metrics: the engine's gauges and counters plus the server's own latency histograms.

Engine values are read from `engine.snapshot()` at scrape time (a custom collector), so they
are never stale and the engine keeps no Prometheus state. Latencies are observed by the server
per request: time to first token, inter-token latency, end-to-end latency.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

prometheus_client.disable_created_metrics()

PREFIX = "minisgl:"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# snapshot key → (metric name, help)
ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "num_running": ("num_requests_running", "Requests in the running batch."),
    "num_waiting": ("num_requests_waiting", "Requests waiting to be scheduled."),
    "kv_usage": ("kv_cache_usage_perc", "Fraction of KV slots held by requests (0..1)."),
    "kv_used_slots": ("kv_cache_used_tokens", "KV slots held by requests."),
    "kv_cached_slots": ("kv_cache_cached_tokens", "KV slots kept by the prefix cache."),
    "kv_total_slots": ("kv_cache_total_tokens", "KV slots in the pool."),
}
ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "num_requests": ("num_requests", "Sequences submitted to the engine."),
    "num_finished": ("num_finished_requests", "Sequences finished (any reason)."),
    "num_aborted": ("num_aborted_requests", "Sequences aborted (client gone, timeout)."),
    "num_preemptions": ("num_preemptions", "Requests preempted for lack of KV slots."),
    "prompt_tokens": ("prompt_tokens", "Prompt tokens of started sequences."),
    "generation_tokens": ("generation_tokens", "Generated tokens."),
    "cached_tokens": ("cached_tokens", "Prompt tokens served from the prefix cache."),
    "num_prefill_cache_hits": ("prefill_cache_hits", "Exact-match prefill cache hits."),
    "num_steps": ("num_steps", "Scheduler steps that ran the model."),
    "forward_tokens": ("forward_tokens", "Tokens run through the model."),
    "future_tokens": ("future_tokens",
                      "Step inputs read on the device from the step before (overlap scheduling)."),
}

# per-engine snapshot key → (metric name, help); labelled engine="<index>"
PER_ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "in_flight": ("engine_sequences_in_flight", "Sequences routed to the engine, not finished."),
    "num_running": ("engine_num_requests_running", "Requests in the engine's running batch."),
    "num_waiting": ("engine_num_requests_waiting", "Requests waiting in the engine."),
    "kv_usage": ("engine_kv_cache_usage_perc", "Fraction of the engine's KV slots in use."),
    "alive": ("engine_alive", "1 while the engine's loop runs, 0 once it stopped."),
}
# rolling-window key → (metric name, help); labelled engine="<index>" or engine="all"
WINDOW_GAUGES: dict[str, tuple[str, str]] = {
    "requests": ("window_requests", "Requests finished within METRIC_WINDOW."),
    "output_tokens_per_s": ("window_output_tokens_per_second",
                            "Output tokens per second over METRIC_WINDOW."),
    "latency_mean_s": ("window_request_latency_mean_seconds",
                       "Mean submit-to-finish latency over METRIC_WINDOW."),
}
POOL_GAUGES: dict[str, tuple[str, str]] = {
    "live_engines": ("pool_live_engines", "Engines in rotation."),
    "in_flight": ("pool_sequences_in_flight", "Sequences in flight in the whole pool."),
    "queued": ("pool_requests_queued", "Requests waiting for room (backpressure queue)."),
}

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
RECENT_SAMPLES = 4096

Snapshot = Callable[[], "dict[str, Any] | None"]


class EngineCollector:
    """Prometheus collector over `engine.snapshot()`; empty while no engine is loaded."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        for key, (name, doc) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(snap.get(key, 0)))
        for key, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=float(snap.get(key, 0)))
        yield from _pool_metrics(snap)


def _pool_metrics(snap: dict[str, Any]) -> Iterator[Metric]:
    """Per-engine gauges and the rolling windows of an engine pool's snapshot."""
    engines = snap.get("engines") or []
    pool = snap.get("pool") or {}
    for key, (name, doc) in PER_ENGINE_GAUGES.items():
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["engine"])
        for view in engines:
            family.add_metric([str(view["engine"])], float(view.get(key) or 0))
        yield family
    for key, (name, doc) in WINDOW_GAUGES.items():
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["engine"])
        for view in engines:
            family.add_metric([str(view["engine"])], float(view["window"].get(key) or 0))
        if pool:
            family.add_metric(["all"], float(pool["window"].get(key) or 0))
        yield family
    for key, (name, doc) in POOL_GAUGES.items():
        if key in pool:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(pool[key]))


class LatencySeries:
    """A Prometheus histogram plus a window of recent samples for the JSON view."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=registry)
        self.recent: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.histogram.observe(seconds)
        self.recent.append(seconds)
        self.count += 1
        self.total += seconds

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.recent)
        return {
            "count": self.count,
            "mean": self.total / self.count if self.count else None,
            "p50": _percentile(ordered, 0.50),
            "p90": _percentile(ordered, 0.90),
            "p99": _percentile(ordered, 0.99),
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class ServerMetrics:
    """All metrics of one app; its own registry, so several apps can live in one process."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot))
        self.ttft = LatencySeries(
            "time_to_first_token_seconds", "Arrival to first generated token.", self.registry
        )
        self.itl = LatencySeries(
            "inter_token_latency_seconds", "Gap between tokens of one sequence.", self.registry
        )
        self.e2e = LatencySeries(
            "e2e_request_latency_seconds", "Arrival to the last token.", self.registry
        )
        self.finished = Counter(
            PREFIX + "request_success",
            "HTTP requests answered in full, by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.failed = Counter(
            PREFIX + "request_failures",
            "HTTP generation requests that ended in an error.",
            ["reason"],
            registry=self.registry,
        )
        self.in_flight = 0
        Gauge(
            PREFIX + "http_requests_in_flight",
            "Generation requests being served.",
            registry=self.registry,
        ).set_function(lambda: self.in_flight)

    def prometheus_text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def json_view(self) -> dict[str, Any]:
        return {
            **(self._snapshot() or {}),
            "in_flight": self.in_flight,
            "latency": {
                "time_to_first_token_seconds": self.ttft.summary(),
                "inter_token_latency_seconds": self.itl.summary(),
                "e2e_request_latency_seconds": self.e2e.summary(),
            },
        }
