"""The HTTP server end to end: a real uvicorn on 127.0.0.1, a tiny random Qwen3, the official
`openai` client and httpx.

Covers the OpenAI chat and completions APIs (streaming and not, n, stop, seed, logprobs,
usage), the NDJSON /generate format, every rejected input as an OpenAI error body, auth,
body size, timeouts, backpressure, /health, /v1/models, /metrics, aborts on disconnect and a
prefix-cache hit visible in usage.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from api.logprobs import TokenTexts, completion_logprobs
from api.server import ServerSettings, create_app
from config import load_config
from engine.engine import Engine
from engine.request import TokenLogprob
from engine.sampling_params import SamplingParams
from multi_device import EnginePool

API_KEY = "sekret-key"
GUARD_TIMEOUT_S = 0.3
GUARD_MAX_BYTES = 4096
METRIC_NAMES = [
    "minisgl:num_requests_running",
    "minisgl:num_requests_waiting",
    "minisgl:kv_cache_usage_perc",
    "minisgl:prompt_tokens_total",
    "minisgl:generation_tokens_total",
    "minisgl:cached_tokens_total",
    "minisgl:num_aborted_requests_total",
    "minisgl:num_preemptions_total",
    "minisgl:time_to_first_token_seconds_bucket",
    "minisgl:inter_token_latency_seconds_bucket",
    "minisgl:e2e_request_latency_seconds_bucket",
]


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port from a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not become ready"
            time.sleep(0.05)

    def wait_loaded(self, timeout_s: float = 60) -> httpx.Response:
        """/health once loading has ended, ready or failed."""
        deadline = time.monotonic() + timeout_s
        while (health := httpx.get(self.url + "/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline, "the engine is still loading"
            time.sleep(0.05)
        return health

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self) -> EnginePool:
        engine = self.app.state.server.engine
        assert engine is not None
        return engine


def engine_factory(model_dir: str) -> Callable[[], Engine]:
    env = {"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32", "KV_CACHE_CPU_TOKENS": "4096"}
    return lambda: Engine(load_config(env))


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: Callable[[str], str]) -> str:
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[LiveServer]:
    config = load_config({"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32",
                          "GENERATE_HF_MODE": "1"})
    live = LiveServer(create_app(engine_factory(model_dir), config=config)).start()
    live.wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded(model_dir: str) -> Iterator[tuple[LiveServer, httpx.Response]]:
    """A server with an API key, a short time limit, a small body limit and one request in
    flight at most; its engine is built only after /health was asked once (the answer is
    returned beside the server)."""
    gate = threading.Event()
    build = engine_factory(model_dir)

    def gated_factory() -> Engine:
        assert gate.wait(timeout=60)
        return build()

    settings = ServerSettings(
        api_key=API_KEY,
        request_timeout_s=GUARD_TIMEOUT_S,
        max_request_bytes=GUARD_MAX_BYTES,
        max_pending_requests=1,
    )
    config = load_config({"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32",
                          "GENERATE_HF_MODE": "1"})
    live = LiveServer(create_app(gated_factory, config=config, settings=settings)).start()
    loading = httpx.get(live.url + "/health")
    gate.set()
    live.wait_ready()
    yield live, loading
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def greedy(max_new_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def snapshot(base_url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return httpx.get(base_url + "/metrics?format=json", headers=headers).json()


def wait_idle(base_url: str, aborted_before: int, headers: dict[str, str] | None = None) -> dict:
    """Metrics once an abort was counted and no request holds KV; fails after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        snap = snapshot(base_url, headers)
        idle = snap["num_running"] == 0 and snap["num_waiting"] == 0 and snap["in_flight"] == 0
        if snap["num_aborted"] > aborted_before and idle and snap["kv_used_slots"] == 0:
            return snap
        assert time.monotonic() < deadline, f"no abort or not idle: {snap}"
        time.sleep(0.05)


# --------------------------------------------------------------- basics
def test_health_models_and_metrics(server: LiveServer, client: openai.OpenAI) -> None:
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok",
                             "engines": [{"engine": 0, "device": "cpu", "alive": True}]}
    assert [m.id for m in client.models.list().data] == [server.engine.model_name]
    assert client.models.retrieve(server.engine.model_name).id == server.engine.model_name
    for missing in ("", "other-model"):  # an empty id too: a 404, never a 500
        answer = httpx.get(server.url + "/v1/models/" + missing)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "model_not_found"
    text = httpx.get(server.url + "/metrics").text
    for name in METRIC_NAMES:
        assert name in text, name
    snap = snapshot(server.url)
    assert {"num_running", "kv_usage", "num_aborted", "latency"} <= snap.keys()
    assert snap["latency"]["time_to_first_token_seconds"]["count"] >= 0


def test_health_is_503_until_the_engine_is_loaded(
    guarded: tuple[LiveServer, httpx.Response],
) -> None:
    _, loading = guarded
    assert (loading.status_code, loading.json()) == (503, {"status": "loading"})


def test_a_server_stopped_while_loading_stops_its_engines(model_dir: str) -> None:
    """Stopping the server before its engines finish loading leaves none running: the
    loading thread, which a cancel cannot stop, stops what it built."""
    gate = threading.Event()
    built: list[Engine] = []
    build = engine_factory(model_dir)

    def gated_factory() -> Engine:
        assert gate.wait(timeout=60)
        built.append(build())
        return built[-1]

    config = load_config({"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32"})
    live = LiveServer(create_app(gated_factory, config=config)).start()
    assert httpx.get(live.url + "/health").json()["status"] == "loading"
    threading.Timer(1.0, gate.set).start()  # it finishes loading after the stop began
    live.stop()
    deadline = time.monotonic() + 60
    while not built or built[0].alive:
        assert time.monotonic() < deadline, "the engine built after the stop runs on"
        time.sleep(0.05)


def test_max_model_len_is_what_the_kv_cache_serves(model_dir: str) -> None:
    """With a KV cache smaller than the model's context, /v1/models reports the cache's
    size: the longest prompt plus max_tokens that a request may ask for."""
    env = {"MODEL_LOCAL_DIR": model_dir, "DTYPE": "float32", "KV_CACHE_TOKENS": "160"}
    config = load_config(env)
    live = LiveServer(create_app(lambda: Engine(config), config=config)).start()
    try:
        live.wait_ready()
        [card] = httpx.get(live.url + "/v1/models").json()["data"]
        assert card["max_model_len"] == 160 < live.engine.max_context_len
        body = {"model": card["id"], "prompt": [1] * 100, "temperature": 0}
        fits = httpx.post(live.url + "/v1/completions", json={**body, "max_tokens": 60})
        assert fits.status_code == 200, fits.text
        past = httpx.post(live.url + "/v1/completions", json={**body, "max_tokens": 61})
        assert past.status_code == 400 and past.json()["error"]["param"] == "max_tokens"
    finally:
        live.stop()


def test_health_reports_a_failed_load(tmp_path: Any) -> None:
    missing = str(tmp_path / "no-model-here")
    config = load_config({"MODEL_LOCAL_DIR": missing})
    live = LiveServer(create_app(lambda: Engine(config), config=config)).start()
    try:
        health = live.wait_loaded(timeout_s=30)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "no-model-here" in health.json()["error"]
        models = httpx.get(live.url + "/v1/models")
        assert models.status_code == 503 and models.json()["error"]["code"] == "model_not_ready"
    finally:
        live.stop()


# ------------------------------------------------------------------ chat
def test_chat_greedy_equals_engine_generate_streaming_and_not(
    server: LiveServer, client: openai.OpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about the sea."}]
    expected = server.engine.generate([messages], greedy(12, ignore_eos=True))[0][0]
    extra = {"ignore_eos": True}
    model = server.engine.model_name
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, extra_body=extra
    )
    assert whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == expected.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details is not None


def test_concurrent_streams_each_get_their_own_greedy_answer(
    server: LiveServer, client: openai.OpenAI
) -> None:
    prompts = [f"Story number {i}:" + " and then" * i for i in range(6)]
    expected = [out[0].text for out in server.engine.generate(prompts, greedy(10, ignore_eos=True))]

    def stream_text(prompt: str) -> str:
        chunks = client.completions.create(
            model=server.engine.model_name,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        assert list(pool.map(stream_text, prompts)) == expected


def test_chat_n2_seed_and_stop(server: LiveServer, client: openai.OpenAI) -> None:
    model = server.engine.model_name
    messages: Any = [{"role": "user", "content": "Write a word."}]

    def sample(seed: int) -> list[str]:
        answer = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            temperature=1.0,
            seed=seed,
            n=2,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in answer.choices] == [0, 1]
        assert answer.usage is not None and answer.usage.completion_tokens == 16
        return [c.message.content or "" for c in answer.choices]

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other
    assert first[0] != first[1]

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=1.0, seed=3, n=2, stream=True
    )
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            by_index[choice.index].append(choice)
    for choices in by_index.values():
        assert choices[0].delta.role == "assistant"
        assert choices[-1].finish_reason in ("stop", "length")

    full = server.engine.generate([messages], greedy(16, ignore_eos=True))[0][0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stop=[stop, "\x00never"],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_top_logprobs_keep_the_sampled_token_among_equal_texts(
    smollm2_tokenizer: Any,
) -> None:
    """Tokens of partial UTF-8 characters all read U+FFFD: a more likely one of the same
    text must not hide the sampled token's own logprob."""
    texts = TokenTexts(smollm2_tokenizer)
    assert texts.get(111)[0] == texts.get(112)[0]
    entries = [TokenLogprob(111, -0.1, [(111, -0.1), (112, -2.5)])]
    out = completion_logprobs(entries, texts, 0)
    assert out.top_logprobs == [{texts.get(111)[0]: -0.1}]
    assert out.token_logprobs == [-0.1]


def test_chat_logprobs(server: LiveServer, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=server.engine.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    content = logprobs.content
    assert len(content) == 6
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token


# ----------------------------------------------------------- completions
def test_completions_greedy_logprobs_and_echo(server: LiveServer, client: openai.OpenAI) -> None:
    model = server.engine.model_name
    prompt = "The capital of France is"
    expected = server.engine.generate([prompt], greedy(10, ignore_eos=True))[0][0]
    whole = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert whole.id.startswith("cmpl-")
    choice = whole.choices[0]
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == expected.text
    offsets = choice.logprobs.text_offset or []
    assert offsets[0] == 0 and offsets == sorted(offsets)
    tops = choice.logprobs.top_logprobs or []
    assert all(len(top) <= 3 for top in tops)  # logprobs, plus the sampled token
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs or [],
                                   tops):
        assert top[token] == logprob
    sampled_only = client.completions.create(
        model=model, prompt=prompt, max_tokens=4, temperature=1.0, seed=5, logprobs=0)
    scored = sampled_only.choices[0].logprobs
    assert scored is not None and scored.tokens and scored.top_logprobs
    assert [list(top) for top in scored.top_logprobs] == [[t] for t in scored.tokens]

    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            echo=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_completions_batch_of_prompts_and_token_ids(
    server: LiveServer, client: openai.OpenAI
) -> None:
    prompts = ["One", "Two words"]
    expected = server.engine.generate(prompts, greedy(4, ignore_eos=True))
    answer = client.completions.create(
        model=server.engine.model_name,
        prompt=prompts,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.text for c in answer.choices] == [e[0].text for e in expected]
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    ids = server.engine.tokenize("Two words")
    by_ids = client.completions.create(
        model=server.engine.model_name,
        prompt=ids,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_ids.choices[0].text == expected[1][0].text


def test_prefix_cache_hit_shows_in_usage(server: LiveServer, client: openai.OpenAI) -> None:
    rng = random.Random(1)
    prefix = [rng.randrange(100, 20000) for _ in range(300)]
    usages = []
    for suffix in ([11, 12, 13], [21, 22, 23]):
        answer = client.completions.create(
            model=server.engine.model_name, prompt=prefix + suffix, max_tokens=2, temperature=0
        )
        assert answer.usage is not None
        usages.append(answer.usage)
    assert usages[1].prompt_tokens == 303
    details = usages[1].prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= 290


# -------------------------------------------------------------- /generate
def test_generate_ndjson_stream_and_whole(server: LiveServer, http: httpx.Client) -> None:
    expected = server.engine.generate(["Once upon a time"], greedy(9, ignore_eos=True))[0][0]
    body = {"prompt": "Once upon a time", "max_new_tokens": 9, "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *deltas, done = lines
    assert all(set(d) == {"text_delta"} for d in deltas)
    assert "".join(d["text_delta"] for d in deltas) == expected.text
    assert done["event"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 9

    whole = http.post("/generate", json={**body, "stream": False}).json()
    assert whole["text"] == expected.text and whole["finish_reason"] == "length"
    assert whole["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


def test_generate_hf_mode_runs_the_baseline(server: LiveServer, http: httpx.Client) -> None:
    prompt = "A short story"
    expected = server.engine.generate([prompt], greedy(6, ignore_eos=True))[0][0]
    body = {
        "prompt": prompt,
        "max_new_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "mode": "hf",
        "stream": False,
    }
    whole = http.post("/generate", json=body)
    assert whole.status_code == 200, whole.text
    assert whole.json()["text"] == expected.text
    assert whole.json()["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line.get("text_delta", "") for line in lines) == expected.text
    assert lines[-1]["event"] == "done" and lines[-1]["finish_reason"] == "length"
    rejected = http.post("/generate", json={**body, "repetition_penalty": 1.3})
    assert rejected.status_code == 400 and rejected.json()["error"]["param"] == "repetition_penalty"
    too_long = http.post("/generate", json={**body, "max_new_tokens": 10**6})  # past the context
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"


# ---------------------------------------------------------------- errors
LONG_TEXT = "word " * 700

BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("/v1/chat/completions", "{not json", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        },
        400,
        "messages[0].content",
    ),
    ("/v1/chat/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 10**15}, 400, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": -3, "max_tokens": 5}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                   {"type": "text"}]}]},
        400,
        "messages[0].content[1].text",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"n": 17}, 400, "n"),
    ("/v1/chat/completions", {"n": True}, 400, "n"),
    ("/v1/chat/completions", {"temperature": 2.5}, 400, "temperature"),
    ("/v1/chat/completions", {"temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {"top_k": 10**400}, 400, "top_k"),
    ("/v1/chat/completions", {"stop": ["ok", ""]}, 400, "stop"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"frobnicate": 1}, 400, "frobnicate"),
    ("/v1/chat/completions", {"model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG_TEXT}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 2**63]}, 400, "prompt"),  # beyond 64 bits
    ("/v1/completions", {"prompt": [-1, 5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 65}, 400, "prompt"),  # past MAX_PROMPTS
    ("/v1/completions", {"prompt": "x", "logprobs": 30}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "suffix": "tail"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "stream": False, "stream_options": {}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [5, -7]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**12]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": list(range(1025))}, 400,
     "stop_token_ids"),
    ("/generate", {"prompt": 5}, 400, "prompt"),
    ("/generate", {"prompt": "x", "mode": "turbo"}, 400, "mode"),
    ("/generate", {"prompt": "x", "max_new_tokens": 0}, 400, "max_tokens"),
    ("/generate", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/generate", {"prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ("/generate", '{"prompt": "x", "temperature": NaN}', 400, None),
    ("/generate", "", 400, None),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_is_an_openai_error(
    server: LiveServer, http: httpx.Client, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, dict) and path == "/v1/chat/completions":
        body = {
            "model": server.engine.model_name,
            "messages": [{"role": "user", "content": "hi"}],
            **body,
        }
    if isinstance(body, dict):
        response = http.post(path, json=body)
    else:
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


def test_bad_input_through_the_openai_client_keeps_the_server_serving(
    server: LiveServer, client: openai.OpenAI
) -> None:
    model = server.engine.model_name
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], temperature=9
        )
    assert caught.value.body is not None and caught.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    ok = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    assert ok.choices[0].message.content is not None


def test_null_fields_mean_absent_and_harmless_extras_are_ignored(
    server: LiveServer, http: httpx.Client
) -> None:
    body = {
        "model": server.engine.model_name,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 3,
        "n": None,
        "logprobs": None,
        "stream": None,
        "tools": None,
        "temperature": None,
        "user": "someone",
        "metadata": {"k": "v"},
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


# ------------------------------------------------------ abort on disconnect
def disconnects(url: str) -> float:
    """minisgl:request_failures_total{reason="disconnect"} (0 before the first)."""
    found = re.search(r'^minisgl:request_failures_total\{reason="disconnect"\} (\S+)$',
                      httpx.get(url + "/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_disconnect_mid_stream_aborts_and_frees_kv(server: LiveServer) -> None:
    idle_kv = snapshot(server.url)["kv_usage"]
    aborted = snapshot(server.url)["num_aborted"]
    dropped = disconnects(server.url)
    body = {"prompt": "Go on forever", "max_new_tokens": 480, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=30) as session:  # noqa: SIM117
        with session.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            assert "text_delta" in json.loads(next(lines))
            assert "text_delta" in json.loads(next(lines))
    snap = wait_idle(server.url, aborted)
    assert snap["num_aborted"] == aborted + 1
    assert snap["kv_usage"] == idle_kv
    text = httpx.get(server.url + "/metrics").text
    assert f"minisgl:num_aborted_requests_total {float(aborted + 1)}" in text
    assert "minisgl:num_requests_running 0.0" in text
    assert disconnects(server.url) == dropped + 1  # a dropped stream is a failed request


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server: LiveServer) -> None:
    aborted = snapshot(server.url)["num_aborted"]
    body = {
        "prompt": "Go on forever",
        "max_new_tokens": 480,
        "temperature": 0,
        "ignore_eos": True,
        "stream": False,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=0.3)
    wait_idle(server.url, aborted)


# --------------------------------------------------------- guarded server
def test_api_key_is_required_except_for_health(
    guarded: tuple[LiveServer, httpx.Response],
) -> None:
    live, _ = guarded
    assert httpx.get(live.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(live.url + path, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0)
    answer = good.completions.create(model=live.engine.model_name, prompt="Hi", max_tokens=2)
    assert answer.choices[0].text is not None


def test_oversized_body_is_413(guarded: tuple[LiveServer, httpx.Response]) -> None:
    live, _ = guarded
    body = json.dumps({"prompt": "x" * GUARD_MAX_BYTES}).encode()
    sized = httpx.post(live.url + "/generate", content=body, headers=auth())

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    chunked = httpx.post(live.url + "/generate", content=chunks(), headers=auth())
    for response in (sized, chunked):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "request_too_large"


def test_request_timeout_aborts_and_tells_the_client(
    guarded: tuple[LiveServer, httpx.Response],
) -> None:
    live, _ = guarded
    aborted = snapshot(live.url, auth())["num_aborted"]
    body = {
        "model": live.engine.model_name,
        "prompt": "Go",
        "max_tokens": 500,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = httpx.post(live.url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout"
    aborted = wait_idle(live.url, aborted, auth())["num_aborted"]

    with httpx.stream(
        "POST",
        live.url + "/v1/completions",
        json={**body, "stream": True},
        headers=auth(),
        timeout=30,
    ) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "request_timeout"
    assert any(e["choices"][0]["text"] for e in events[:-2])
    wait_idle(live.url, aborted, auth())


def test_too_many_requests_in_flight_is_429(guarded: tuple[LiveServer, httpx.Response]) -> None:
    live, _ = guarded
    body = {"prompt": "Go", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=live.url, headers=auth(), timeout=30) as session:  # noqa: SIM117
        with session.stream("POST", "/generate", json=body) as running:
            lines = running.iter_lines()  # held: dropping the iterator closes the connection
            assert "text_delta" in json.loads(next(lines))
            busy = session.post("/generate", json=body)
    assert busy.status_code == 429
    assert busy.json()["error"]["type"] == "rate_limit_error"


def test_hf_mode_keeps_the_time_limit_and_the_in_flight_cap(
    guarded: tuple[LiveServer, httpx.Response],
) -> None:
    live, _ = guarded
    hf = {"prompt": "Go", "max_new_tokens": 400, "temperature": 0, "ignore_eos": True,
          "mode": "hf"}
    with httpx.Client(base_url=live.url, headers=auth(), timeout=120) as session:
        with session.stream("POST", "/generate", json=hf) as response:
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert lines[-1]["event"] == "error", lines[-1]
        assert lines[-1]["error"]["code"] == "request_timeout"
        engine = {"prompt": "Go", "max_new_tokens": 500, "temperature": 0, "ignore_eos": True}
        with session.stream("POST", "/generate", json=engine) as running:
            held = running.iter_lines()  # held: dropping the iterator closes the connection
            assert "text_delta" in json.loads(next(held))
            busy = session.post("/generate", json=hf)
        assert busy.status_code == 429, busy.text


# ------------------------------------------------------- the embedded default


def test_embedded_default_model_through_the_openai_client(model_cache_dir: str) -> None:
    """With no model flag the server serves the embedded SmolLM2 (its own defaults: int4
    weights on this CPU); streamed and whole greedy chats agree with the server's engine."""
    config = load_config({"MODEL_CACHE_DIR": model_cache_dir})
    live = LiveServer(create_app(config=config)).start()
    try:
        live.wait_ready(timeout_s=600)  # converts and quantizes the model on first use
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        assert model.id == "SmolLM2-135M-Instruct"
        messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(
            model=model.id, messages=messages, max_tokens=24, temperature=0
        )
        chunks = list(
            client.chat.completions.create(
                model=model.id, messages=messages, max_tokens=24, temperature=0, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = whole.choices[0].message.content or ""
        assert streamed == text
        assert "Paris" in text
        [[local]] = live.engine.generate([messages], greedy(24))
        assert local.text == text
        hf = httpx.post(live.url + "/generate", timeout=30,  # off unless the operator allows
                        json={"prompt": "Hi", "max_new_tokens": 2, "mode": "hf"})
        assert hf.status_code == 400 and hf.json()["error"]["code"] == "mode_unavailable"
        assert live.app.state.server.hf._baseline is None  # no second copy was loaded
    finally:
        live.stop()
