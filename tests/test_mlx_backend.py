"""The MLX backend (BACKEND_IMPL=mlx) on this CPU through `mlx[cpu]`: the embedded SmolLM2 in
float32 gives the native engine's greedy text, alone and batched, after a prompt-cache hit
and with chunked prefill on a rotating KV cache; a real server streams it to the official
`openai` client (stop strings, /metrics, a refused parameter as an OpenAI 400); a missing
MLX is a clear start-up error.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from api.server import create_app
from backend.factory import resolve_backend
from backend.mlx import is_apple_silicon, require_mlx
from config import ConfigError, load_config
from engine.base import EngineBase, GenerateOutput, Prompt
from engine.engine import Engine
from engine.sampling_params import InvalidRequestError, SamplingParams
from tests.test_server import METRIC_NAMES, LiveServer

pytest.importorskip("mlx_lm")
pytest.importorskip("mlx.core")

from backend.mlx.engine import MLXEngine  # noqa: E402

NEW_TOKENS = 10
CHAT: list[dict[str, str]] = [{"role": "user", "content": "What is 2+2?"}]
PROMPTS: list[Prompt] = ["The capital of France is", CHAT, "1, 2, 3, 4, 5,"]


def greedy(max_tokens: int = NEW_TOKENS, **extra: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0, **extra)


def mlx_env(model_dir: str, **flags: str) -> dict[str, str]:
    return {"MODEL_LOCAL_DIR": model_dir, "BACKEND_IMPL": "mlx", "DTYPE": "float32", **flags}


def run_each(engine: EngineBase, prompts: list[Prompt], max_tokens: int = NEW_TOKENS
             ) -> list[GenerateOutput]:
    """Each prompt on its own (no batching), greedy."""
    return [engine.generate([p], greedy(max_tokens))[0][0] for p in prompts]


@pytest.fixture(scope="module")
def native(smollm2_dir: str) -> list[GenerateOutput]:
    """The native engine's float32 greedy outputs of PROMPTS."""
    engine = Engine(load_config({"MODEL_LOCAL_DIR": smollm2_dir, "DTYPE": "float32"}))
    try:
        return [outs[0] for outs in engine.generate(PROMPTS, greedy())]
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def server(smollm2_dir: str) -> Iterator[LiveServer]:
    """A server whose pool builds its engine from BACKEND_IMPL=mlx."""
    live = LiveServer(create_app(config=load_config(mlx_env(smollm2_dir)))).start()
    live.wait_ready(timeout_s=120)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def engine(server: LiveServer) -> MLXEngine:
    first = server.engine.first
    assert isinstance(first, MLXEngine)
    return first


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ------------------------------------------------------------- the engine
def test_greedy_text_equals_the_native_engine(
    engine: MLXEngine, native: list[GenerateOutput]
) -> None:
    engine.flush_cache()
    for out, ref in zip(run_each(engine, PROMPTS), native, strict=True):
        assert out.text == ref.text
        assert out.token_ids == ref.token_ids
        assert out.finish_reason == ref.finish_reason
        assert out.usage.prompt_tokens == ref.usage.prompt_tokens
    assert "Paris" in native[0].text and "4" in native[1].text


def test_concurrent_requests_run_in_one_batch(
    engine: MLXEngine, native: list[GenerateOutput]
) -> None:
    engine.flush_cache()
    steps = engine.stats.num_steps
    outs = [o[0] for o in engine.generate(PROMPTS, greedy())]
    assert [o.text for o in outs] == [r.text for r in native]
    generated = sum(o.usage.completion_tokens for o in outs)
    assert engine.stats.num_steps - steps < generated  # several sequences per step


def test_second_turn_reuses_the_prompt_cache(engine: MLXEngine) -> None:
    engine.flush_cache()
    [first] = run_each(engine, [CHAT])
    second_turn: Prompt = [*CHAT, {"role": "assistant", "content": first.text},
                           {"role": "user", "content": "And 3+3?"}]
    [warm] = run_each(engine, [second_turn], max_tokens=4)
    assert warm.usage.cached_tokens > 0
    assert warm.usage.cached_tokens >= first.usage.prompt_tokens
    engine.flush_cache()
    assert engine.snapshot()["kv_cached_slots"] == 0
    [cold] = run_each(engine, [second_turn], max_tokens=4)
    assert cold.usage.cached_tokens == 0
    assert warm.text == cold.text and warm.token_ids == cold.token_ids


def test_unsupported_sampling_parameter_is_refused(engine: MLXEngine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.submit("hi", greedy(presence_penalty=0.5), lambda _: None)
    assert caught.value.param == "presence_penalty"
    assert "MLX" in str(caught.value)


def test_stop_strings_seeds_n_logprobs_and_abort(
    engine: MLXEngine, native: list[GenerateOutput]
) -> None:
    stop = native[0].text[4:8]
    [[cut]] = engine.generate([PROMPTS[0]], greedy(stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == native[0].text[: native[0].text.index(stop)]
    sampled = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=7, n=2)
    first = engine.generate(["Once upon a time"], sampled)[0]
    again = engine.generate(["Once upon a time"], sampled)[0]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert first[0].token_ids != first[1].token_ids  # n sequences, each with its own seed

    [[scored]] = engine.generate([PROMPTS[0]], greedy(3, logprobs=True, top_logprobs=2))
    assert scored.token_ids == native[0].token_ids[:3]
    for entry in scored.logprobs:
        assert len(entry.top) == 2 and entry.top[0][0] == entry.token_id
        assert entry.top[0][1] == pytest.approx(entry.logprob) and entry.logprob <= 0

    aborted = engine.stats.num_aborted
    stream = engine.stream(PROMPTS[0], greedy(200, ignore_eos=True))
    assert not next(stream).finished
    stream.close()  # the client leaves: the request is aborted
    deadline = time.monotonic() + 10
    while engine.stats.num_aborted == aborted or engine.snapshot()["num_running"]:
        assert time.monotonic() < deadline, engine.snapshot()
        time.sleep(0.02)


def test_chunked_prefill_on_a_rotating_cache(
    smollm2_dir: str, native: list[GenerateOutput]
) -> None:
    from mlx_lm.models.cache import RotatingKVCache

    config = load_config(mlx_env(smollm2_dir, MLX_PREFILL_STEP_SIZE="4",
                                 MLX_MAX_KV_SIZE="256"))
    small = MLXEngine(config)
    try:
        assert isinstance(small.runner.make_cache()[0], RotatingKVCache)
        outs = [o[0] for o in small.generate(PROMPTS[:2], greedy())]
        assert [o.text for o in outs] == [r.text for r in native[:2]]
    finally:
        small.shutdown()


# ------------------------------------------------------------- the server
def test_chat_and_completions_stream_like_whole_answers(
    server: LiveServer, client: openai.OpenAI, native: list[GenerateOutput]
) -> None:
    model = server.engine.model_name
    messages: Any = CHAT
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0
    )
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed == native[1].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == native[1].usage.completion_tokens

    prompt = str(PROMPTS[0])
    stop = native[0].text[4:8]
    completion = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stop=[stop]
    )
    pieces = list(client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stop=[stop],
        stream=True,
    ))
    expected = native[0].text[: native[0].text.index(stop)]
    assert completion.choices[0].text == expected
    assert completion.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].text for p in pieces) == expected
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_unsupported_parameter_is_an_openai_400_and_the_server_serves_on(
    server: LiveServer, client: openai.OpenAI
) -> None:
    model = server.engine.model_name
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": model, "messages": CHAT, "frequency_penalty": 0.5, "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "frequency_penalty" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", presence_penalty=1.0, max_tokens=2)
    ok = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_metrics_count_the_mlx_engine(server: LiveServer, client: openai.OpenAI) -> None:
    client.completions.create(model=server.engine.model_name, prompt="Hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in METRIC_NAMES:
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("minisgl:") and "{" not in line}
    assert values["minisgl:generation_tokens_total"] >= 3
    assert values["minisgl:prompt_tokens_total"] > 0
    assert values["minisgl:num_requests_running"] == 0
    snap = httpx.get(server.url + "/metrics?format=json").json()
    assert snap["latency"]["time_to_first_token_seconds"]["count"] > 0
    assert snap["num_finished"] >= 1 and snap["num_steps"] > 0
    health = httpx.get(server.url + "/health").json()
    assert health["engines"][0]["device"] == "mlx:cpu"


# ------------------------------------------------------------- start-up
def test_missing_mlx_is_a_clear_start_up_error() -> None:
    require_mlx()  # installed here
    with pytest.raises(ConfigError, match=r"mlx_missing_for_test.*pip install 'mlx\[cpu\]'"):
        require_mlx(("mlx.core", "mlx_missing_for_test"))


def test_backend_resolution() -> None:
    assert resolve_backend(load_config({"BACKEND_IMPL": "mlx"})) == "mlx"
    assert resolve_backend(load_config({"BACKEND_IMPL": "sgl"})) == "sgl"
    auto = resolve_backend(load_config({}))
    assert auto == ("mlx" if is_apple_silicon() else "auto")
    assert resolve_backend(load_config({"LOAD_FORMAT": "dummy"})) == "auto"
