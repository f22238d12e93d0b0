"""Engines in worker processes (ENGINE_PROCESSES=1, engine/worker.py): two CPU workers behind
a live server, checked against the in-process engine; aborts, bad requests, metrics, and a
killed worker. One server (two spawned workers) serves the whole module; the test that
kills a worker runs last."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import pytest

from api.server import create_app
from config import load_config
from engine.engine import Engine
from engine.request import StreamDelta
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.worker import ProcessEngine
from multi_device import EnginePool
from tests.test_server import LiveServer

PROMPTS = ["The sea is", "Tell me a story about", "1, 2, 3,", "Paris is the capital of"]


def _env(model_dir: str) -> dict[str, str]:
    return {"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32", "KV_CACHE_CPU_TOKENS": "4096"}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: Callable[[str], str]) -> str:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def live(model_dir: str) -> Iterator[LiveServer]:
    config = load_config({**_env(model_dir), "NUM_ENGINES": "2", "ENGINE_PROCESSES": "1",
                          "SCHEDULER_MODE": "rr"})
    server = LiveServer(create_app(config=config)).start()
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool(live: LiveServer) -> EnginePool:
    return live.engine


@pytest.fixture(scope="module")
def reference(model_dir: str) -> Iterator[Engine]:
    engine = Engine(load_config(_env(model_dir)))
    yield engine
    engine.shutdown()


def workers(pool: EnginePool) -> list[ProcessEngine]:
    engines = [slot.engine for slot in pool.slots]
    assert all(isinstance(e, ProcessEngine) for e in engines)
    return engines  # type: ignore[return-value]


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def settled(pool: EnginePool) -> bool:
    """No request open anywhere: the parent's sinks, the pool, each worker's snapshot."""
    return pool._total == 0 and all(
        e.open_requests == 0 and e.snapshot()["num_running"] == 0
        and e.snapshot()["num_waiting"] == 0 and e.snapshot()["kv_used_slots"] == 0
        for e in workers(pool))


def test_workers_are_processes_and_report_the_model(pool: EnginePool, reference: Engine
                                                    ) -> None:
    engines = workers(pool)
    assert len({e.pid for e in engines}) == 2 and os.getpid() not in {e.pid for e in engines}
    assert all(e.alive and e.device_name == "cpu" for e in engines)
    assert pool.max_context_len == reference.max_context_len
    assert engines[0].info == reference.info
    assert pool.health()["status"] == "ok"


def test_greedy_equals_the_in_process_engine_across_both_workers(
    pool: EnginePool, reference: Engine
) -> None:
    steps = [e.snapshot()["num_requests"] for e in workers(pool)]
    expected = reference.generate(PROMPTS, greedy(12))
    got = pool.generate(PROMPTS, greedy(12))  # all at once: both workers busy together
    for want, have in zip(expected, got, strict=True):
        assert have[0].token_ids == want[0].token_ids
        assert have[0].text == want[0].text
        assert have[0].usage == want[0].usage and have[0].finish_reason == "length"
    wait_for(lambda: all(e.snapshot()["num_requests"] > before
                         for e, before in zip(workers(pool), steps, strict=True)),
             "both workers to report their requests")
    wait_for(lambda: settled(pool), "the pool to settle")


def test_openai_streaming_through_the_server(live: LiveServer, reference: Engine) -> None:
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "Tell me about the sea."}]
    expected = reference.generate([messages], greedy(10))[0][0]

    def stream() -> str:
        chunks = list(client.chat.completions.create(
            model=live.engine.model_name, messages=messages, max_tokens=10, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    texts: list[str] = []
    threads = [threading.Thread(target=lambda: texts.append(stream())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert texts == [expected.text] * 3


def test_a_bad_request_fails_synchronously(live: LiveServer, pool: EnginePool) -> None:
    with pytest.raises(InvalidRequestError, match="token ids"):
        pool.submit([10**6], greedy(2), lambda delta: None)
    with pytest.raises(InvalidRequestError, match="context"):
        workers(pool)[0].submit([5] * 600, greedy(2), lambda delta: None)
    response = httpx.post(live.url + "/v1/completions", timeout=30, json={
        "model": pool.model_name, "prompt": [10**6], "max_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    seen: list[StreamDelta] = []
    with pytest.raises(InvalidRequestError):  # a bad one in a batch queues none of it
        workers(pool)[0].submit_many([([5, 6, 7], greedy(2), seen.append, None),
                                      ([10**6], greedy(2), seen.append, None)])
    time.sleep(0.5)
    assert not seen
    assert pool._total == 0 and all(e.open_requests == 0 for e in workers(pool))


def test_pool_abort_and_client_disconnect_free_the_request(
    live: LiveServer, pool: EnginePool
) -> None:
    aborted = sum(e.snapshot()["num_aborted"] for e in workers(pool))
    deltas: list[StreamDelta] = []
    rid = pool.submit(pool.tokenize("Go on"), greedy(480), deltas.append)
    wait_for(lambda: len(deltas) >= 2, "the first tokens")
    pool.abort(rid)
    wait_for(lambda: bool(deltas) and deltas[-1].finished, "the abort")
    assert deltas[-1].finish_reason == "abort"

    body = {"prompt": "Go on forever", "max_new_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=live.url, timeout=30) as session:  # noqa: SIM117
        with session.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            next(lines), next(lines)
    wait_for(lambda: settled(pool), "the aborted requests to be freed")
    wait_for(lambda: sum(e.snapshot()["num_aborted"] for e in workers(pool)) == aborted + 2,
             "the workers to count both aborts")


def test_metrics_count_the_workers(live: LiveServer, pool: EnginePool) -> None:
    wait_for(lambda: settled(pool), "the pool to settle")
    view = httpx.get(live.url + "/metrics?format=json").json()
    assert view["pool"]["live_engines"] == 2
    assert view["generation_tokens"] == sum(e["generation_tokens"] for e in view["engines"])
    assert all(e["generation_tokens"] > 0 for e in view["engines"])
    text = httpx.get(live.url + "/metrics").text
    assert 'minisgl:engine_alive{engine="1"} 1.0' in text
    assert "minisgl:generation_tokens_total" in text
    assert "minisgl:num_requests_running 0.0" in text
    assert pool.insert_prefix("a shared system prompt") > 0
    assert pool.flush_cache() > 0  # run in the workers, answered over the pipe
    # the workers' snapshots come with the answer: no stale cache in /metrics
    assert all(e.snapshot()["kv_cached_slots"] == 0 for e in workers(pool))
    for worker in workers(pool):  # Ctrl-C at the terminal reaches the workers too
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(e.alive for e in workers(pool))  # they stop on the server's word only
    [[out]] = pool.generate(["after the interrupt"], greedy(3))
    assert len(out.token_ids) == 3


def test_a_killed_worker_fails_its_requests_and_the_other_serves_on(
    live: LiveServer, pool: EnginePool
) -> None:  # last: it leaves engine 1 dead
    victim = workers(pool)[1]

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            body = {"model": pool.model_name, "temperature": 0, "ignore_eos": True,
                    "max_tokens": 480}
            tasks = [asyncio.create_task(client.post(
                "/v1/completions", json={**body, "prompt": f"story {i}"})) for i in range(2)]
            await asyncio.to_thread(wait_for, lambda: all(
                e.snapshot()["num_running"] == 1 for e in workers(pool)), "both to run")
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            return list(await asyncio.gather(*tasks))

    responses = asyncio.run(scenario())
    assert sorted(r.status_code for r in responses) == [200, 503]
    failed = next(r for r in responses if r.status_code == 503)
    assert failed.json()["error"]["code"] == "engine_unavailable"
    wait_for(lambda: not victim.alive and victim.open_requests == 0, "the worker to be dead")
    wait_for(lambda: pool.health()["status"] == "degraded", "the pool to degrade")
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert [e["alive"] for e in health.json()["engines"]] == [True, False]
    after = httpx.post(live.url + "/v1/completions", timeout=60, json={
        "model": pool.model_name, "prompt": "again", "max_tokens": 3})
    assert after.status_code == 200
