"""The engine pool (multi_device.py) with two CPU engines: routing modes, backpressure,
warm prefixes, adaptive max_tokens, per-engine metrics, and a dead engine."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import pytest

from api.server import create_app
from config import load_config
from engine.engine import Engine
from engine.request import StreamDelta
from engine.sampling_params import InvalidRequestError, SamplingParams
from multi_device import EnginePool, PoolBusy, PoolDown, PrefixIndex, RollingWindow
from tests.test_server import LiveServer

PREFIX = list(range(300, 364))  # 64 tokens = 4 router blocks


def _ids(seed: int, n: int = 24) -> list[int]:
    return [(seed * 131 + i * 17) % 5000 + 100 for i in range(n)]


def _env(model_dir: str, **flags: str) -> dict[str, str]:
    return {"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32", "KV_CACHE_CPU_TOKENS": "4096",
            "NUM_ENGINES": "2", **flags}


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: Callable[[str], str]) -> str:
    return tiny_model_factory("qwen3")


def make_pool(model_dir: str, **flags: str) -> EnginePool:
    return EnginePool(load_config(_env(model_dir, **flags)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def pool(model_dir: str) -> Iterator[EnginePool]:
    pool = make_pool(model_dir, SCHEDULER_MODE="rr")
    yield pool
    pool.shutdown()


def _route(pool: EnginePool, mode: str, ids: list[int]) -> int:
    pool.config = replace(pool.config, scheduler_mode=mode)
    return pool.route(ids).index


def _release_all(pool: EnginePool) -> None:
    for slot in pool.slots:
        pool.cancel(slot, slot.in_flight)


def test_pool_builds_one_engine_per_entry(pool: EnginePool) -> None:
    assert len(pool.slots) == 2 and all(s.engine.alive for s in pool.slots)
    assert pool.health()["status"] == "ok"


def test_round_robin_and_random(pool: EnginePool) -> None:
    assert [_route(pool, "rr", _ids(i)) for i in range(4)] in ([0, 1, 0, 1], [1, 0, 1, 0])
    _release_all(pool)
    picks = {_route(pool, "random", _ids(i)) for i in range(24)}
    assert picks == {0, 1}
    _release_all(pool)
    assert pool._total == 0


def test_fewest_in_flight(pool: EnginePool) -> None:
    pool.slots[0].in_flight, pool._total = 3, 3
    assert _route(pool, "fsfs", _ids(1)) == 1
    assert _route(pool, "fsfs", _ids(2)) == 1
    assert _route(pool, "fsfs", _ids(3)) == 1  # 3 vs 2: still engine 1
    assert _route(pool, "fsfs", _ids(4)) == 0  # 3 vs 3: the lower index
    _release_all(pool)


def test_cache_aware_follows_the_prefix_and_balances(pool: EnginePool) -> None:
    pool.flush_cache()
    first = _route(pool, "cache_aware", PREFIX + _ids(1, 8))
    other = 1 - first
    assert _route(pool, "cache_aware", _ids(7, 64)) == other  # no match: the idler engine
    pool.slots[first].in_flight += 5  # busier, but within the balance thresholds
    pool._total += 5
    assert _route(pool, "cache_aware", PREFIX + _ids(2, 8)) == first
    pool.slots[first].in_flight += 40  # far busier: load wins over the cache
    pool._total += 40
    assert _route(pool, "cache_aware", PREFIX + _ids(3, 8)) == other
    _release_all(pool)


def test_cache_aware_requests_reuse_the_engine_cache(model_dir: str) -> None:
    pool = make_pool(model_dir, SCHEDULER_MODE="cache_aware")
    try:
        [[warm]] = pool.generate([PREFIX + _ids(1, 8)], greedy(4))
        [[unrelated]] = pool.generate([_ids(9, 80)], greedy(4))
        outs = pool.generate([PREFIX + _ids(i, 8) for i in range(2, 6)], greedy(4))
        assert warm.usage.cached_tokens == 0 and unrelated.usage.cached_tokens == 0
        assert all(out.usage.cached_tokens >= len(PREFIX) for [out] in outs)
        assert pool._total == 0
    finally:
        pool.shutdown()


def test_a_failing_consumer_gives_its_place_back(model_dir: str) -> None:
    """A consumer that raises (on its first delta, or on its last) ends its own request;
    its place in the pool goes back and the pool serves on."""
    pool = make_pool(model_dir)
    try:
        for fail_on_finish in (False, True):
            seen: list[StreamDelta] = []

            def breaks(delta: StreamDelta, fail_on_finish: bool = fail_on_finish,
                       seen: list[StreamDelta] = seen) -> None:
                seen.append(delta)
                if delta.finished or not fail_on_finish:
                    raise RuntimeError("injected: the consumer is gone")

            pool.submit(_ids(7, 16), greedy(50 if not fail_on_finish else 3), breaks)
            deadline = time.monotonic() + 30
            while pool.snapshot()["pool"]["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.snapshot()["pool"]["in_flight"] == 0
            assert all(not slot.requests for slot in pool.slots)
            assert len(seen) == (3 if fail_on_finish else 1)  # nothing after the failure
        [[out]] = pool.generate([_ids(8, 16)], greedy(4))
        assert len(out.token_ids) == 4
    finally:
        pool.shutdown()


def test_prefix_index_and_window() -> None:
    index = PrefixIndex(max_blocks=8)
    hashes = PrefixIndex.hashes(list(range(100)))
    assert len(hashes) == 6
    index.insert(hashes[:4])
    assert index.match(hashes) == 64
    assert index.match(PrefixIndex.hashes([7] + list(range(99)))) == 0
    index.insert(PrefixIndex.hashes(list(range(1000, 1100))))
    assert len(index) == 8  # LRU-bounded
    window = RollingWindow(10.0)
    window.record(0.5, 20, now=100.0)
    window.record(1.5, 40, now=105.0)
    summary = window.summary(now=112.0)
    assert summary["requests"] == 1 and summary["output_tokens_per_s"] == 4.0
    for second in range(1000):  # nobody reads it: still bounded by the window
        window.record(0.1, 1, now=200.0 + second)
    assert len(window._events) <= 11


def test_warm_queue_inserts_once(model_dir: str) -> None:
    pool = make_pool(model_dir)
    try:
        text = " ".join(["warm"] * 40)
        assert pool.warm(text) and pool.warm(text)
        deadline = time.monotonic() + 30
        while pool.warm_stats["inserted"] + pool.warm_stats["skipped"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pool.warm_stats == {"queued": 2, "inserted": 1, "skipped": 1, "failed": 0}
        ids = pool.tokenize(text)
        [[out]] = pool.generate([ids + [5, 6]], greedy(2))
        assert out.usage.cached_tokens >= len(ids) - 1
        with pytest.raises(InvalidRequestError):  # refused before it is queued
            pool.warm([7] * pool.max_context_len)
        assert pool.warm_stats["queued"] == 2
    finally:
        pool.shutdown()


def test_a_failed_warm_leaves_no_router_record(model_dir: str) -> None:
    """A background warm whose insert fails takes back what it recorded: the router must
    not send requests to an engine for a prefix it does not hold."""
    pool = make_pool(model_dir, SCHEDULER_MODE="cache_aware")
    try:
        ids = _ids(4, 64)
        target = pool.slots[0].engine

        def fails(prompt: object) -> int:
            raise RuntimeError("injected: the insert failed")

        target.insert_prefix = fails  # type: ignore[method-assign]
        assert pool.warm(ids)
        deadline = time.monotonic() + 30
        while pool.warm_stats["failed"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        hashes = PrefixIndex.hashes(ids)
        assert all(slot.prefixes.match(hashes) == 0 for slot in pool.slots)
        assert pool.warm_stats["inserted"] == 0
    finally:
        pool.shutdown()


# ------------------------------------------------------------------ HTTP
def _server(model_dir: str, **flags: str) -> LiveServer:
    config = load_config(_env(model_dir, **flags))
    live = LiveServer(create_app(config=config)).start()
    live.wait_ready()
    return live


async def _flood(url: str, count: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body: dict[str, Any] = {"model": "qwen3", "max_tokens": max_tokens, "temperature": 0,
                                "ignore_eos": True}
        return await asyncio.gather(*(
            client.post("/v1/completions", json={**body, "prompt": _ids(i, 16)})
            for i in range(count)))


def test_flood_past_the_caps_gets_200s_and_429s(model_dir: str) -> None:
    live = _server(model_dir, MAX_INFLIGHT_PER_ENGINE="1", MAX_QUEUE="2",
                   QUEUE_TIMEOUT_S="1", SCHEDULER_MODE="fsfs")
    try:
        start = time.monotonic()
        responses = asyncio.run(_flood(live.url, 16, 40))
        elapsed = time.monotonic() - start
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) >= 4  # 2 running + 2 queued at least
        for r in responses:
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "server_busy"
            else:
                assert r.json()["usage"]["completion_tokens"] == 40
        assert elapsed < 30
        pool = live.app.state.server.engine
        snap = pool.snapshot()
        assert snap["pool"]["in_flight"] == 0 and snap["pool"]["queued"] == 0
        assert {v["engine"] for v in snap["engines"] if v["num_finished"]} == {0, 1}
    finally:
        live.stop()


def test_warm_prefixes_adaptive_tokens_and_metrics(model_dir: str) -> None:
    warm = " ".join(["system"] * 48)
    live = _server(model_dir, WARM_PREFIXES=f"{warm} || short one", MAX_INFLIGHT_TOTAL="2",
                   ADAPTIVE_MAX_NEW_TOKENS="1", ADAPTIVE_LOAD_THRESHOLD="0.5",
                   ADAPTIVE_FACTOR="0.5", METRIC_WINDOW="30")
    try:
        pool = live.app.state.server.engine
        warm_len = len(pool.tokenize(warm))
        with httpx.Client(base_url=live.url, timeout=60) as client:
            first = client.post("/v1/completions", json={
                "model": "qwen3", "prompt": warm + " and more", "max_tokens": 4})
            assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= warm_len
            assert first.json()["usage"]["adjusted_max_tokens"] is None
            long_running = asyncio.run(_long_and_short(live.url))
            assert long_running["usage"]["adjusted_max_tokens"] == 10
            assert long_running["usage"]["completion_tokens"] <= 10
            text = client.get("/metrics").text
        assert 'minisgl:engine_alive{engine="0"} 1.0' in text
        assert 'minisgl:engine_alive{engine="1"} 1.0' in text
        assert 'minisgl:window_requests{engine="all"}' in text
        assert "minisgl:pool_live_engines 2.0" in text
        view = httpx.get(live.url + "/metrics?format=json").json()
        assert view["pool"]["window"]["requests"] >= 2
    finally:
        live.stop()


def test_a_refused_request_is_not_routed(model_dir: str) -> None:
    """A request refused with a 400 never reaches the router: its prompt is not counted
    as held by an engine, so a later warm or request is not misled."""
    live = _server(model_dir)
    try:
        pool = live.app.state.server.engine
        prompt = _ids(6, 48)
        refused = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "qwen3", "prompt": prompt, "max_tokens": 10**6})
        assert refused.status_code == 400
        hashes = PrefixIndex.hashes(prompt)
        assert all(slot.prefixes.match(hashes) == 0 for slot in pool.slots)
        assert pool.snapshot()["pool"]["in_flight"] == 0
    finally:
        live.stop()


def test_the_check_before_routing_holds_for_every_engine(model_dir: str) -> None:
    """Engines of different KV sizes: a request the smaller one cannot hold is refused
    before routing, whichever engine the router would pick."""
    env = {"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32", "SCHEDULER_MODE": "rr"}
    engines = [Engine(load_config({**env, "KV_CACHE_CPU_TOKENS": tokens}))
               for tokens in ("4096", "300")]
    pool = EnginePool(load_config(env), engines=engines)  # type: ignore[arg-type]
    try:
        ids = _ids(8, 48)
        with pytest.raises(InvalidRequestError, match="KV cache of 300"):
            pool.check(ids, greedy(400))
        pool.check(ids, greedy(200))
    finally:
        pool.shutdown()


def test_default_max_tokens_fits_one_engines_kv_cache(model_dir: str) -> None:
    """Two engines of 300 KV slots under a 512-token context: a request that names no
    max_tokens gets what one engine holds (a request runs on one engine), not a 400."""
    live = _server(model_dir, KV_CACHE_CPU_TOKENS="300", MAX_NEW_TOKENS_DEFAULT="512")
    try:
        reply = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "qwen3", "prompt": _ids(4, 16), "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 300 - 16
    finally:
        live.stop()


async def _long_and_short(url: str) -> dict[str, Any]:
    """A long request holds one of two slots; the next one is cut by the adaptive factor."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body = {"model": "qwen3", "temperature": 0, "ignore_eos": True}
        long_task = asyncio.create_task(client.post(
            "/v1/completions", json={**body, "prompt": _ids(1, 16), "max_tokens": 300}))
        await asyncio.sleep(0.3)
        short = await client.post(
            "/v1/completions", json={**body, "prompt": _ids(2, 16), "max_tokens": 20})
        # past the context: refused as it would be unloaded, never scaled into range or a 500
        for too_many in (10**400, 10**6):
            refused = await client.post("/v1/completions", json={
                **body, "prompt": _ids(3, 16), "max_tokens": too_many})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == "max_tokens"
        await long_task
        result: dict[str, Any] = short.json()
        return result


def test_a_client_that_leaves_while_queued_gives_its_place_back(model_dir: str) -> None:
    """With the one place in flight taken, a request queued behind it whose client goes
    away leaves the queue within a disconnect poll, not at QUEUE_TIMEOUT_S."""
    live = _server(model_dir, MAX_INFLIGHT_TOTAL="1", MAX_QUEUE="1", QUEUE_TIMEOUT_S="60")
    try:
        pool = live.app.state.server.engine
        taken = pool.route(_ids(1))  # the place, held without an engine request
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", timeout=1.0, json={
                "model": "qwen3", "prompt": _ids(2, 16), "max_tokens": 4})
        deadline = time.monotonic() + 5
        while pool.snapshot()["pool"]["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.snapshot()["pool"]["queued"] == 0
        assert pool.snapshot()["pool"]["in_flight"] == 1  # only the place taken above
        pool.cancel(taken, 1)
        after = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "qwen3", "prompt": _ids(3, 16), "max_tokens": 4})
        assert after.status_code == 200, after.text
    finally:
        live.stop()


def test_the_time_limit_counts_the_wait_in_the_queue(model_dir: str) -> None:
    """REQUEST_TIMEOUT_S bounds a request from its arrival: one queued behind a full pool
    gets its 504 at the limit (not a 429 at QUEUE_TIMEOUT_S) and leaves the queue."""
    live = _server(model_dir, MAX_INFLIGHT_TOTAL="1", QUEUE_TIMEOUT_S="30",
                   REQUEST_TIMEOUT_S="1")
    try:
        pool = live.app.state.server.engine
        taken = pool.route(_ids(1))  # the place, held without an engine request
        started = time.monotonic()
        answer = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "qwen3", "prompt": _ids(2, 16), "max_tokens": 4})
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 5
        assert pool.snapshot()["pool"]["queued"] == 0
        assert pool.snapshot()["pool"]["in_flight"] == 1  # only the place taken above
        pool.cancel(taken, 1)
    finally:
        live.stop()


def test_a_stopped_engine_gets_no_work_and_shutdown_ends_open_requests(model_dir: str) -> None:
    """An engine whose loop stopped leaves rotation at once (not at the watchdog's next
    look); shutting the pool down ends every request still open with an abort."""
    pool = make_pool(model_dir, SCHEDULER_MODE="rr")
    try:
        victim = pool.slots[1].engine
        victim._stopped.set()  # type: ignore[attr-defined]
        victim._inbox.put(("stop", None))  # type: ignore[attr-defined]
        victim._thread.join(timeout=30)  # type: ignore[attr-defined]
        assert [s.index for s in pool.live_slots()] == [0]
        outs = pool.generate([_ids(i, 8) for i in range(4)], greedy(3))
        assert [o[0].finish_reason for o in outs] == ["length"] * 4
        results: list[Any] = []
        running = threading.Thread(target=lambda: results.append(
            pool.generate([_ids(9, 8)], greedy(480))), daemon=True)
        running.start()
        deadline = time.monotonic() + 30
        while not pool.slots[0].requests and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        pool.shutdown()
    running.join(timeout=30)
    assert not running.is_alive()
    assert results[0][0][0].finish_reason == "abort"


def test_a_dead_engine_degrades_the_pool(model_dir: str) -> None:
    live = _server(model_dir, SCHEDULER_MODE="rr")
    try:
        pool = live.app.state.server.engine
        victim = pool.slots[1].engine

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
                body = {"model": "qwen3", "temperature": 0, "ignore_eos": True,
                        "max_tokens": 480}
                tasks = [asyncio.create_task(client.post(
                    "/v1/completions", json={**body, "prompt": _ids(i, 16)})) for i in range(2)]
                await asyncio.sleep(0.3)
                counted.update(pool.snapshot())
                victim._stopped.set()  # the loop stops mid-request, as a crashed loop would
                victim._inbox.put(("stop", None))
                return list(await asyncio.gather(*tasks))

        counted: dict[str, Any] = {}
        start = time.monotonic()
        responses = asyncio.run(scenario())
        assert sorted(r.status_code for r in responses) == [200, 503]
        after = pool.snapshot()  # counters keep the stopped engine's counts: never go down
        assert after["num_requests"] >= counted["num_requests"] > 0
        assert after["generation_tokens"] >= counted["generation_tokens"] > 0
        failed = next(r for r in responses if r.status_code == 503)
        assert failed.json()["error"]["code"] == "engine_unavailable"
        assert time.monotonic() - start < 60
        health = httpx.get(live.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert [e["alive"] for e in health.json()["engines"]] == [True, False]
        after = httpx.post(live.url + "/v1/completions", timeout=60, json={
            "model": "qwen3", "prompt": _ids(5, 8), "max_tokens": 3})
        assert after.status_code == 200
    finally:
        live.stop()


def test_admission_queue_orders_times_out_and_forgets_leavers(model_dir: str) -> None:
    pool = make_pool(model_dir, MAX_INFLIGHT_TOTAL="1", MAX_QUEUE="2", QUEUE_TIMEOUT_S="0.3")

    async def scenario() -> None:
        first = await pool.admit(_ids(1))
        with pytest.raises(PoolBusy, match="no capacity"):
            await pool.admit(_ids(2))  # waits 0.3 s, then gives up
        leaver = asyncio.create_task(pool.admit(_ids(3)))
        stayer = asyncio.create_task(pool.admit(_ids(4)))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolBusy, match="busy"):
            await pool.admit(_ids(5))  # the queue holds two already
        leaver.cancel()  # a client that went away while queued
        await asyncio.sleep(0.01)
        pool.cancel(first, 1)
        second = await stayer
        assert pool._total == 1
        pool.cancel(second, 1)
        assert pool._total == 0 and not pool._waiters

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


def test_a_leaving_head_lets_smaller_waiters_in_and_dead_slots_refuse(model_dir: str) -> None:
    pool = make_pool(model_dir, MAX_INFLIGHT_TOTAL="4", QUEUE_TIMEOUT_S="5")

    async def scenario() -> None:
        held = [await pool.admit(_ids(i)) for i in range(3)]
        big = asyncio.create_task(pool.admit(_ids(10), weight=2))  # does not fit: waits
        await asyncio.sleep(0.02)
        small = asyncio.create_task(pool.admit(_ids(11), weight=1))  # fits, but queued behind
        await asyncio.sleep(0.02)
        assert not small.done()
        big.cancel()  # the head leaves: the one behind it gets the free room at once
        placed = await asyncio.wait_for(small, 1.0)
        assert pool._total == 4
        placed.alive = False  # taken out between admission and submission
        with pytest.raises(PoolDown):
            pool.submit(_ids(11), greedy(2), lambda delta: None, slot=placed)
        placed.alive = True
        for slot in held:
            pool.cancel(slot, 1)
        assert pool._total == 0

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
