"""The engine's greedy output equals HF transformers `generate`, token for token (float32).

Alone, inside a busy batch of mixed lengths, after a prefix-cache hit, after preemption
forced by a tiny KV pool, and with chunked prefill splitting the prompt; on tiny random
Llama, Qwen2, Qwen3 and Mistral models and on the embedded SmolLM2. The engine tests run
with and without overlap scheduling (OVERLAP_SCHEDULE), which must not change any output.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from backend.batch import ForwardBatch
from backend.sglang.kernels.triton.extend_attention import tile_tokens
from backend.sglang.runner import NativeRunner
from config import ConfigError, load_config
from engine.engine import Engine
from engine.request import StreamDelta
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import StepPlan

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
OVERLAP = ["off", "on"]
DEVICE = os.environ.get("MINISGL_TEST_DEVICE", "cpu")  # "cuda" on a GPU machine
NEW_TOKENS = 12


def greedy(n: int = NEW_TOKENS, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(100, 20000) for _ in range(rng.randint(low, high))] for _ in range(count)
    ]


class Reference:
    """HF transformers greedy `generate` on the same folder, float32, EOS ignored."""

    def __init__(self, path: str) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.to(DEVICE)

    def generate(
        self, prompt: list[int], n: int = NEW_TOKENS, stop_at_eos: bool = False
    ) -> list[int]:
        gen = GenerationConfig(
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=self.model.generation_config.eos_token_id if stop_at_eos else [],
            pad_token_id=0,
        )
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt], device=DEVICE), generation_config=gen)
        return out[0, len(prompt) :].tolist()


def make_engine(path: str, **flags: str) -> Engine:
    env = {
        "MODEL_LOCAL_DIR": path,
        "DTYPE": "float32",
        "DEVICE": DEVICE,
        "KV_CACHE_TOKENS": "8192",
    }
    env.update(flags)
    return Engine(load_config(env))


@pytest.fixture(scope="module", params=[(a, o) for o in OVERLAP for a in ARCHS],
                ids=lambda p: f"{p[0]}-overlap-{p[1]}")
def arch_setup(
    request: pytest.FixtureRequest, tiny_model_factory
) -> Iterator[tuple[Engine, Reference]]:
    arch, overlap = request.param
    path = tiny_model_factory(arch)
    engine = make_engine(path, OVERLAP_SCHEDULE=overlap)
    assert engine.overlap == (overlap == "on")
    yield engine, Reference(path)
    engine.shutdown()


def test_alone(arch_setup: tuple[Engine, Reference]) -> None:
    engine, ref = arch_setup
    prompt = random_prompts(1, 20, 20, seed=1)[0]
    [[out]] = engine.generate([prompt], greedy())
    assert out.token_ids == ref.generate(prompt)
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == 20 and out.usage.completion_tokens == NEW_TOKENS


def test_busy_batch_of_16(arch_setup: tuple[Engine, Reference]) -> None:
    engine, ref = arch_setup
    prompts = random_prompts(16, 3, 60, seed=2)
    lengths = [4 + i % 9 for i in range(16)]
    outs = engine.generate(prompts, [greedy(n) for n in lengths])
    for prompt, n, [out] in zip(prompts, lengths, outs):
        assert out.token_ids == ref.generate(prompt, n)


def test_prefix_cache_hit(arch_setup: tuple[Engine, Reference]) -> None:
    engine, ref = arch_setup
    shared = random_prompts(1, 48, 48, seed=3)[0]
    first = shared + [7, 8, 9]
    second = shared + [11, 12]
    engine.generate([first], greedy())
    [[out]] = engine.generate([second], greedy())
    assert out.usage.cached_tokens >= len(shared)
    assert out.token_ids == ref.generate(second)


@pytest.mark.parametrize("overlap", OVERLAP)
@pytest.mark.parametrize(("arch", "prefix_cache"), [("qwen3", "1"), ("llama", "0")])
def test_preemption_with_tiny_pool(
    tiny_model_factory, arch: str, prefix_cache: str, overlap: str
) -> None:
    path = tiny_model_factory(arch)
    engine = make_engine(path, KV_CACHE_TOKENS="160", PREFIX_CACHE=prefix_cache,
                         OVERLAP_SCHEDULE=overlap)
    try:
        prompts = random_prompts(10, 20, 40, seed=4)
        outs = engine.generate(prompts, greedy(24))
        assert engine.scheduler.stats.num_preemptions > 0
        ref = Reference(path)
        for prompt, [out] in zip(prompts, outs):
            assert out.token_ids == ref.generate(prompt, 24)
        assert engine.snapshot()["kv_used_slots"] == 0
        if prefix_cache == "0":
            assert engine.scheduler.allocator.num_used == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_chunked_prefill(tiny_model_factory, overlap: str) -> None:
    path = tiny_model_factory("mistral")
    engine = make_engine(path, CHUNKED_PREFILL_SIZE="16", OVERLAP_SCHEDULE=overlap)
    try:
        prompts = random_prompts(4, 50, 90, seed=6)
        outs = engine.generate(prompts, greedy())
        ref = Reference(path)
        for prompt, [out] in zip(prompts, outs):
            assert out.token_ids == ref.generate(prompt)
        assert engine.stats.num_steps > 90 // 16
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir: str) -> Iterator[tuple[Engine, Reference]]:
    engine = make_engine(smollm2_dir)
    yield engine, Reference(smollm2_dir)
    engine.shutdown()


def test_smollm2_chat_matches_hf(smollm2_engine: tuple[Engine, Reference]) -> None:
    engine, ref = smollm2_engine
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.tokenize(messages)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    [[out]] = engine.generate([messages], params)
    assert out.token_ids == ref.generate(prompt, 24, stop_at_eos=True)
    assert "Paris" in out.text


def test_smollm2_batch_prefix_and_chunks(smollm2_engine: tuple[Engine, Reference]) -> None:
    engine, ref = smollm2_engine
    questions = ["Name a color.", "Count to five.", "What is 2+2?", "Say hello in French."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    prompts = [engine.tokenize(c) for c in chats]
    engine.generate([[{"role": "user", "content": "Hi"}]], greedy(1))  # caches the template head
    outs = engine.generate(prompts, greedy(16))
    for prompt, [out] in zip(prompts, outs):
        assert out.token_ids == ref.generate(prompt, 16)
        assert out.usage.cached_tokens > 0  # the shared system prompt of the template


def test_smollm2_fp8_kv_cache(smollm2_dir: str,
                              smollm2_engine: tuple[Engine, Reference]) -> None:
    """KV_CACHE_DTYPE=fp8_e4m3: the pool holds 8-bit K/V, and greedy decoding of a real model
    stays on HF's float32 path (the answer and its opening tokens)."""
    _, ref = smollm2_engine
    engine = make_engine(smollm2_dir, KV_CACHE_DTYPE="fp8_e4m3")
    try:
        pool = engine.runner.kv_pool  # type: ignore[attr-defined]  # the native runner's
        assert pool.k[0].dtype == torch.float8_e4m3fn
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = engine.tokenize(messages)
        [[out]] = engine.generate([messages], SamplingParams(max_new_tokens=24, temperature=0.0))
        expected = ref.generate(prompt, 24, stop_at_eos=True)
        assert out.token_ids[:8] == expected[:8]
        assert "Paris" in out.text
    finally:
        engine.shutdown()


def test_fp8_kv_cache_needs_the_native_runner(tiny_model_factory) -> None:
    with pytest.raises(ConfigError, match="KV_CACHE_DTYPE"):
        make_engine(tiny_model_factory("llama"), BACKEND_IMPL="hf", KV_CACHE_DTYPE="fp8_e4m3")


def test_n_sequences_share_the_prompt(tiny_model_factory) -> None:
    engine = make_engine(tiny_model_factory("qwen3"))
    try:
        prompt = random_prompts(1, 40, 40, seed=7)[0]
        [outs] = engine.generate(
            [prompt], SamplingParams(max_new_tokens=8, n=2, temperature=1.0, seed=3)
        )
        assert [o.index for o in outs] == [0, 1]
        assert outs[1].usage.cached_tokens >= len(prompt) - 1
        assert outs[0].token_ids != outs[1].token_ids
    finally:
        engine.shutdown()


def test_seed_reproducible_across_batches(arch_setup: tuple[Engine, Reference]) -> None:
    engine, _ = arch_setup
    prompt = random_prompts(1, 10, 10, seed=8)[0]
    seeded = SamplingParams(
        max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True
    )
    [[alone]] = engine.generate([prompt], seeded)
    others = random_prompts(5, 5, 30, seed=9)
    noisy = [SamplingParams(max_new_tokens=6, temperature=0.8, ignore_eos=True) for _ in others]
    outs = engine.generate(others + [prompt], noisy + [seeded])
    assert outs[-1][0].token_ids == alone.token_ids


def test_overlap_changes_no_output(
    smollm2_dir: str, smollm2_engine: tuple[Engine, Reference]
) -> None:
    """EOS, stop strings, max_tokens, penalties, seeds and logprobs under overlap scheduling
    give what the synchronous engine gives; nothing leaks."""
    engine, _ = smollm2_engine
    questions = ["What is the capital of France?", "Count from 1 to 10.", "Name a fruit.",
                 "Say hi.", "Write one word.", "What is 2+2?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    params = [
        SamplingParams(max_new_tokens=30, temperature=0.0),
        SamplingParams(max_new_tokens=40, temperature=0.0, stop=[", 5"]),
        SamplingParams(max_new_tokens=3, temperature=0.0),
        SamplingParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.3,
                       frequency_penalty=0.5),
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=11, logprobs=True,
                       top_logprobs=2),
        SamplingParams(max_new_tokens=12, temperature=0.0, n=2, presence_penalty=0.4),
    ]
    expected = engine.generate(chats, params)
    overlapped = make_engine(smollm2_dir, OVERLAP_SCHEDULE="on")
    try:
        got = overlapped.generate(chats, params)
        for want, have in zip(expected, got):
            for a, b in zip(want, have, strict=True):
                assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text,
                                                                   a.finish_reason)
                assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (
                    a.usage.prompt_tokens, a.usage.completion_tokens)
                assert [x.token_id for x in b.logprobs] == [x.token_id for x in a.logprobs]
        assert {o.finish_reason for outs in got for o in outs} == {"stop", "length"}
        assert engine.stats.future_tokens == 0 and overlapped.stats.future_tokens > 50
        snap = overlapped.snapshot()
        assert snap["num_running"] == 0 and snap["kv_used_slots"] == 0
    finally:
        overlapped.shutdown()


def test_stop_string_is_not_returned(smollm2_engine: tuple[Engine, Reference]) -> None:
    engine, _ = smollm2_engine
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    [[full]] = engine.generate([messages], SamplingParams(max_new_tokens=40, temperature=0.0))
    assert "5" in full.text
    cut = full.text.index("5")
    stop = full.text[cut - 1 : cut + 2]  # spans the token boundary around "5"
    [[out]] = engine.generate(
        [messages], SamplingParams(max_new_tokens=40, temperature=0.0, stop=[stop])
    )
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]


def test_multibyte_stream_concatenates_exactly(smollm2_engine: tuple[Engine, Reference]) -> None:
    engine, _ = smollm2_engine
    prompt = "Translate to Chinese and add emoji: I love tea 🍵. 我爱喝茶"
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    deltas = list(engine.stream(prompt, params))
    text = "".join(d.text for d in deltas)
    assert all("\ufffd" not in d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert deltas[-1].finished


@pytest.mark.parametrize("overlap", OVERLAP)
def test_abort_frees_slots(tiny_model_factory, overlap: str) -> None:
    engine = make_engine(tiny_model_factory("llama"), PREFIX_CACHE="0", OVERLAP_SCHEDULE=overlap)
    try:
        stream = engine.stream([5] * 30, greedy(400))
        first = next(stream)
        assert first.token_ids
        stream.close()
        engine.call(lambda: None)
        engine.call(lambda: None)
        snap = engine.snapshot()
        assert snap["num_running"] == 0 and snap["kv_used_slots"] == 0
        assert snap["num_aborted"] == 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_shutdown_ends_the_open_streams(tiny_model_factory, overlap: str) -> None:
    """A stream running when the engine shuts down ends with an error (a 503: the engine
    is gone) instead of waiting for deltas that never come."""
    engine = make_engine(tiny_model_factory("llama"), OVERLAP_SCHEDULE=overlap)
    engine.add_turn_hook(lambda: time.sleep(0.01))  # 450 steps outlast the shutdown below
    seen: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
    started = threading.Event()

    def consume() -> None:
        for delta in engine.stream([5] * 30, greedy(450)):
            seen.put(delta)
            started.set()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        assert started.wait(timeout=30)
    finally:
        engine.shutdown()
    consumer.join(timeout=10)
    assert not consumer.is_alive(), "the stream still waits after shutdown"
    deltas = [seen.get() for _ in range(seen.qsize())]
    last = deltas[-1]
    assert last.finish_reason == "abort" and last.error == "engine shut down"
    assert last.error_status == 503
    assert sum(len(d.token_ids) for d in deltas) < 450


def test_a_chat_template_that_refuses_the_messages_is_a_bad_request(tiny_model_factory) -> None:
    """Templates raise for what they cannot render (Gemma's and Mistral's: a system turn):
    a 400 naming the messages, for every caller of `tokenize` (API, pool, scripts)."""
    engine = make_engine(tiny_model_factory("llama"))
    try:
        engine.tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('System role not supported') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}")
        assert engine.tokenize([{"role": "user", "content": "hi"}])
        with pytest.raises(InvalidRequestError, match="System role not supported") as caught:
            engine.tokenize([{"role": "system", "content": "Be brief"},
                             {"role": "user", "content": "hi"}])
        assert caught.value.param == "messages"
    finally:
        engine.shutdown()


def test_generate_needs_one_params_per_prompt(tiny_model_factory) -> None:
    engine = make_engine(tiny_model_factory("llama"))
    try:
        prompts = random_prompts(2, 6, 6, seed=3)
        with pytest.raises(ValueError, match="2 prompts but 3 sampling params"):
            engine.generate(prompts, [greedy(2)] * 3)
        with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
            engine.generate(prompts, [greedy(2)])
        assert [len(outs) for outs in engine.generate(prompts, [greedy(2)] * 2)] == [1, 1]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_a_failed_step_caches_none_of_its_kv(tiny_model_factory, overlap: str) -> None:
    """A step that raises (a device out of memory, say) ends the requests in it with an
    error and the engine keeps serving; the slots that step never wrote reach no cache, so
    the same prompt again is computed afresh and equals HF."""
    path = tiny_model_factory("llama")
    engine = make_engine(path, OVERLAP_SCHEDULE=overlap)
    forward = engine.runner.forward
    calls = 0

    def fails_once(batch: ForwardBatch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected: out of memory")
        return forward(batch)

    engine.runner.forward = fails_once  # type: ignore[method-assign]
    try:
        prompt = random_prompts(1, 40, 40, seed=7)[0]
        [[failed]] = engine.generate([prompt], greedy())
        assert failed.finish_reason == "abort"
        snap = engine.snapshot()
        assert snap["kv_used_slots"] == 0 and snap["kv_cached_slots"] == 0
        [[again]] = engine.generate([prompt], greedy())
        assert again.usage.cached_tokens == 0
        assert again.token_ids == Reference(path).generate(prompt)
    finally:
        engine.shutdown()


def test_a_truncated_prefix_cache_does_not_serialize_sharers(tiny_model_factory) -> None:
    """With PREFIX_CACHE_MAX_TOKENS below the prompt, requests sharing a prompt (n > 1
    siblings, an extension) still decode together once the first prompt is computed."""
    path = tiny_model_factory("llama")
    engine = make_engine(path, PREFIX_CACHE_MAX_TOKENS="16")
    try:
        prompt = random_prompts(1, 80, 80, seed=5)[0]
        steps = engine.stats.num_steps
        pair = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, n=2)
        outs = engine.generate([prompt, prompt + [123, 456]], [pair, greedy(30)])
        assert engine.stats.num_steps - steps < 2 * 30  # together, not one after the other
        ref = Reference(path)
        assert [o.token_ids for o in outs[0]] == [ref.generate(prompt, 30)] * 2
        assert outs[1][0].token_ids == ref.generate(prompt + [123, 456], 30)
    finally:
        engine.shutdown()


def test_chat_without_a_chat_template_is_a_clear_error(tiny_model_factory, tmp_path) -> None:
    """Chat messages for a model whose tokenizer has no chat template: a 400-class error
    naming `messages`, not a crash deep in the tokenizer."""
    import json
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_factory("llama"), folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    engine = make_engine(str(folder))
    try:
        with pytest.raises(InvalidRequestError, match="no chat template") as caught:
            engine.tokenize([{"role": "user", "content": "hi"}])
        assert caught.value.param == "messages"
        assert engine.tokenize("hi")  # text still works
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_a_prompt_split_over_steps_is_shared_not_recomputed(
    tiny_model_factory, overlap: str
) -> None:
    """A prompt whose prefill takes two steps is cached only after the second: a request
    sharing its first 80 tokens, sent beside it, waits for that and reuses them instead of
    computing them again in the second step."""
    path = tiny_model_factory("llama")
    engine = make_engine(path, CHUNKED_PREFILL_SIZE="64", OVERLAP_SCHEDULE=overlap)
    try:
        shared = random_prompts(1, 80, 80, seed=11)[0]
        first, second = shared + [301, 302], shared + [401, 402, 403]
        outs = engine.generate([first, second], [greedy(8), greedy(8)])
        assert outs[1][0].usage.cached_tokens >= 64  # the shared tokens, to a cache block
        ref = Reference(path)
        assert outs[0][0].token_ids == ref.generate(first, 8)
        assert outs[1][0].token_ids == ref.generate(second, 8)
    finally:
        engine.shutdown()


def test_a_dead_loop_fails_its_requests_and_callers(tiny_model_factory) -> None:
    """An engine loop that stops outside a step (a bug, say) ends its open requests with an
    error, and callers waiting on it (a generation, a call between steps) get an error
    instead of waiting for good."""
    engine = make_engine(tiny_model_factory("llama"))
    try:
        deltas: queue.SimpleQueue[StreamDelta] = queue.SimpleQueue()
        engine.submit(random_prompts(1, 8, 8, seed=3)[0], greedy(400), deltas.put)
        assert not deltas.get(timeout=30).finished  # it runs

        def dies() -> None:
            raise SystemExit("injected: the loop stops")

        engine.add_turn_hook(dies)
        last = deltas.get(timeout=30)
        while not last.finished:
            last = deltas.get(timeout=30)
        assert last.finish_reason == "abort" and last.error
        assert not engine.alive
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="has stopped"):
            engine.call(lambda: 1)
        with pytest.raises(RuntimeError, match="has stopped"):
            engine.generate([random_prompts(1, 8, 8, seed=4)[0]], greedy(2))
        with pytest.raises(RuntimeError, match="has stopped"):
            list(engine.stream(random_prompts(1, 8, 8, seed=5)[0], greedy(2)))
        assert time.monotonic() - started < 10
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overlap", OVERLAP)
def test_a_failing_consumer_costs_only_its_own_request(tiny_model_factory, overlap: str) -> None:
    """A sink that raises (say, an asyncio consumer whose event loop has closed) aborts its
    own request; the loop keeps running, a request beside it equals HF, no slot leaks."""
    path = tiny_model_factory("llama")
    engine = make_engine(path, OVERLAP_SCHEDULE=overlap)
    try:
        seen: list[StreamDelta] = []

        def breaks(delta: StreamDelta) -> None:
            seen.append(delta)
            raise RuntimeError("injected: the consumer is gone")

        engine.submit(random_prompts(1, 20, 20, seed=1)[0], greedy(200), breaks)
        bystander = random_prompts(1, 20, 20, seed=2)[0]
        [[out]] = engine.generate([bystander], greedy(40))
        assert out.token_ids == Reference(path).generate(bystander, 40)
        assert len(seen) == 1 and engine.alive  # one delta tried, then the request ended
        deadline = time.monotonic() + 10
        while engine.snapshot()["kv_used_slots"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.snapshot()["kv_used_slots"] == 0
        assert engine.snapshot()["num_aborted"] == 1
    finally:
        engine.shutdown()


def test_warmup_leaves_nothing_behind(tiny_model_factory) -> None:
    """Warm-up (on CUDA: also prompts extending a short and a long cached prompt beside
    requests decoding it, and an extend alone) runs each of those steps, also when called
    again with the caches holding the earlier calls' prompts (on CUDA `warmup()` has made
    these calls already), frees every slot it used and changes no later output."""
    path = tiny_model_factory("qwen3")
    engine = make_engine(path)
    scheduler = engine.scheduler
    schedule = scheduler.schedule
    contexts: list[int] = []  # longest one-token context of each mixed step
    # (beside one-token rows, tokens per program of the extend kernel in bfloat16 on CUDA)
    extends: list[tuple[bool, int]] = []
    assert isinstance(engine.runner, NativeRunner)
    config = engine.runner.model.config
    group = config.num_heads // config.num_kv_heads

    def recording_schedule() -> StepPlan | None:
        plan = schedule()
        if plan is not None and plan.batch is not None and plan.batch.single_rows is not None:
            contexts.append(plan.batch.max_single_seq_len)
        if plan is not None and plan.batch is not None and not plan.batch.is_decode:
            run, prefix_heavy = plan.batch.extend_shape
            if run:
                tokens = tile_tokens(group, config.head_dim, 2, run, prefix_heavy)
                extends.append((plan.batch.single_rows is not None, tokens))
        return plan

    scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    try:
        engine.warmup()
        for context in (8, 300, 8, 300):  # its CUDA part, on any device, twice
            start = len(contexts)
            engine._warm_prefill_beside_decode(context)
            assert any(context <= n <= context + 40 for n in contexts[start:]), contexts
        engine._warm_extend_alone(300)
        # the extend kernel's two tile sizes, each beside one-token rows and alone
        small, large = (tile_tokens(group, config.head_dim, 2, 1024, heavy)
                        for heavy in (False, True))
        assert small < large
        assert set(extends) == {(True, small), (True, large), (False, small), (False, large)}
        snap = engine.snapshot()
        assert snap["num_running"] == 0 and snap["kv_used_slots"] == 0
        assert snap["num_finished"] >= 10
        prompt = random_prompts(1, 20, 20, seed=1)[0]
        [[out]] = engine.generate([prompt], greedy())
        assert out.token_ids == Reference(path).generate(prompt)
    finally:
        engine.shutdown()


def test_context_errors(arch_setup: tuple[Engine, Reference]) -> None:
    engine, _ = arch_setup
    too_long = [5] * engine.max_context_len
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(too_long, greedy(), sink=lambda d: None)
    with pytest.raises(InvalidRequestError) as exc:
        engine.submit([5] * 10, greedy(engine.max_context_len), sink=lambda d: None)
    assert exc.value.param == "max_tokens"


def test_concurrent_requests_share_a_prefix(arch_setup: tuple[Engine, Reference]) -> None:
    engine, ref = arch_setup
    shared = random_prompts(1, 80, 80, seed=10)[0]
    prompts = [shared + tail for tail in random_prompts(4, 3, 6, seed=11)]
    outs = engine.generate(prompts, greedy())
    assert sorted(out.usage.cached_tokens for [out] in outs)[1:] >= [len(shared)] * 3
    for prompt, [out] in zip(prompts, outs):
        assert out.token_ids == ref.generate(prompt)


@pytest.mark.parametrize("arch", ["phi3", "gpt_neox"])
def test_other_architectures_fall_back_to_transformers(tiny_model_factory, arch: str) -> None:
    path = tiny_model_factory(arch)
    engine = make_engine(path, KV_CACHE_TOKENS="160")
    try:
        assert type(engine.runner).__name__ == "HFRunner"
        prompts = random_prompts(8, 10, 40, seed=12)
        outs = engine.generate(prompts, greedy(20))
        assert engine.scheduler.stats.num_preemptions > 0
        ref = Reference(path)
        for prompt, [out] in zip(prompts, outs):
            assert out.token_ids == ref.generate(prompt, 20)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("change", ["yarn_rope", "bin_weights"])
def test_auto_falls_back_to_transformers_for_what_native_lacks(
    tiny_model_factory, tmp_path, change: str
) -> None:
    """A rope scaling the native runner lacks, or weights only as pytorch_model.bin:
    BACKEND_IMPL=auto serves the model through the transformers runner, equal to HF."""
    import json
    import shutil

    folder = tmp_path / change
    shutil.copytree(tiny_model_factory("llama"), folder)
    if change == "yarn_rope":
        config = json.loads((folder / "config.json").read_text())
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0,
                                  "original_max_position_embeddings": 256}
        config.pop("rope_parameters", None)
        (folder / "config.json").write_text(json.dumps(config))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    engine = make_engine(str(folder))
    try:
        assert type(engine.runner).__name__ == "HFRunner"
        prompt = random_prompts(1, 12, 12, seed=21)[0]
        [[out]] = engine.generate([prompt], greedy(6))
        assert out.token_ids == Reference(str(folder)).generate(prompt, 6)
    finally:
        engine.shutdown()


def test_prefill_cache_serves_an_identical_prompt(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen2")
    engine = make_engine(path)
    try:
        prompt = random_prompts(1, 30, 30, seed=13)[0]
        [[first]] = engine.generate([prompt], greedy())
        forward_tokens = engine.stats.forward_tokens
        [[second]] = engine.generate([prompt], greedy())
        assert engine.scheduler.stats.num_prefill_cache_hits == 1
        assert second.usage.cached_tokens == len(prompt)
        assert engine.stats.forward_tokens - forward_tokens == NEW_TOKENS - 1
        assert second.token_ids == first.token_ids == Reference(path).generate(prompt)
    finally:
        engine.shutdown()


def test_identical_prompts_submitted_together_share_one_prefill(tiny_model_factory) -> None:
    """The second of two identical prompts waits for the first's prefill and is admitted in
    the very next step from the prefill cache, while (on CUDA) that step's stored logits
    may still be on their way from the device: it must read them in stream order."""
    path = tiny_model_factory("qwen2")
    engine = make_engine(path)
    try:
        prompt = random_prompts(1, 40, 40, seed=17)[0]
        [[first], [second]] = engine.generate([prompt, prompt], greedy())
        assert engine.scheduler.stats.num_prefill_cache_hits == 1
        assert second.usage.cached_tokens == len(prompt)
        assert second.token_ids == first.token_ids == Reference(path).generate(prompt)
    finally:
        engine.shutdown()


def test_multi_turn_chat_reuses_its_history(smollm2_engine: tuple[Engine, Reference]) -> None:
    engine, _ = smollm2_engine
    chat = [{"role": "user", "content": "Give me a fun fact about owls."}]
    [[answer]] = engine.generate([chat], SamplingParams(max_new_tokens=30, temperature=0.0))
    chat += [
        {"role": "assistant", "content": answer.text},
        {"role": "user", "content": "And one about cats?"},
    ]
    [[follow_up]] = engine.generate([chat], SamplingParams(max_new_tokens=8, temperature=0.0))
    first_turn = engine.tokenize(chat[:1]) + answer.token_ids
    second_prompt = engine.tokenize(chat)
    shared = next(
        (i for i, (a, b) in enumerate(zip(first_turn, second_prompt)) if a != b),
        min(len(first_turn), len(second_prompt)),
    )
    # everything the two turns share token for token comes from the cache (re-tokenizing
    # the answer's text may split a word differently from how it was generated)
    assert shared > len(engine.tokenize(chat[:1]))
    assert follow_up.usage.cached_tokens == shared


def test_asyncio_stream_and_insert_prefix(tiny_model_factory) -> None:
    path = tiny_model_factory("qwen3")
    engine = make_engine(path)
    try:
        prefix = random_prompts(1, 64, 64, seed=14)[0]
        assert engine.insert_prefix(prefix) == len(prefix)
        prompt = prefix + [21, 22, 23]

        async def collect() -> list:
            return [delta async for delta in engine.astream(prompt, greedy())]

        deltas = asyncio.run(collect())
        assert deltas[-1].finish_reason == "length"
        assert deltas[-1].usage is not None and deltas[-1].usage.cached_tokens >= len(prefix)
        assert [t for d in deltas for t in d.token_ids] == Reference(path).generate(prompt)
    finally:
        engine.shutdown()


def test_overlap_keeps_unseeded_sampling(tiny_model_factory) -> None:
    """A request that stops while the next step is queued is not sampled again, so the
    shared generator draws for the same rows as without overlap."""
    path = tiny_model_factory("llama")
    prompt_a, prompt_b = random_prompts(2, 10, 10, seed=21)
    probe = make_engine(path)
    try:
        [[full]] = probe.generate([prompt_a], greedy(6))
    finally:
        probe.shutdown()
    params = [
        SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[full.token_ids[2]]),
        SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True),
    ]
    outputs = {}
    for overlap in OVERLAP:
        engine = make_engine(path, OVERLAP_SCHEDULE=overlap)
        try:
            outs = engine.generate([prompt_a, prompt_b], params)
            outputs[overlap] = [(o.token_ids, o.finish_reason) for [o] in outs]
        finally:
            engine.shutdown()
    assert outputs["on"] == outputs["off"]
    assert outputs["on"][0][1] == "stop" and len(outputs["on"][1][0]) == 12


@pytest.mark.parametrize(("arch", "overlap"), [("qwen3", "on"), ("llama", "off")])
def test_cascade_attention_matches_hf(tiny_model_factory, arch: str, overlap: str) -> None:
    """Requests sharing a cached 40-token prefix decode in cascade groups (the triton kernel
    set; the interpreter on CPU) and still equal HF token for token, next to one that
    shares nothing and a long one whose chunked prefill makes some of those steps mixed
    (their one-token requests keep the plan). The warm-up's cascade part runs first (once):
    two requests decoding as a group beside a prefill, and nothing left behind."""
    pytest.importorskip("triton")
    from transformers import AutoConfig

    from backend.sglang.runner import NativeRunner

    path = tiny_model_factory(arch)
    runner = NativeRunner(path, AutoConfig.from_pretrained(path), dtype=torch.float32,
                          device=torch.device(DEVICE), num_kv_slots=2048,
                          kernel_set="triton", cascade_attention=True,
                          cuda_graph=DEVICE == "cuda", cuda_graph_max_bs=8)
    engine = Engine(load_config({"MODEL_LOCAL_DIR": path, "DTYPE": "float32", "DEVICE": DEVICE,
                                 "CASCADE_MIN_PREFIX": "16", "OVERLAP_SCHEDULE": overlap,
                                 "CHUNKED_PREFILL_SIZE": "32"}),
                    runner=runner)
    try:
        stats = engine.scheduler.stats
        if arch == "qwen3":  # once: the interpreter takes seconds per step on CPU
            engine._warm_prefill_beside_decode(24, copies=2)  # on CUDA, part of warmup()
            assert stats.num_cascade_mixed_steps >= 1
            assert engine.snapshot()["num_running"] == 0
        warm_steps, warm_mixed = stats.num_cascade_steps, stats.num_cascade_mixed_steps
        ref = Reference(path)
        shared = random_prompts(1, 40, 40, seed=12)[0]
        prompts = [shared + tail for tail in random_prompts(5, 2, 9, seed=13)]
        prompts.insert(2, random_prompts(1, 30, 30, seed=14)[0])
        prompts.append(random_prompts(1, 150, 150, seed=15)[0])
        outs = engine.generate(prompts, greedy())
        assert stats.num_cascade_steps - warm_steps >= NEW_TOKENS - 2
        assert stats.num_cascade_mixed_steps > warm_mixed
        if runner.cuda_graphs is not None:  # CUDA: the steps replayed cascade graphs
            assert runner.cuda_graphs.cascade_graphs and runner.cuda_graphs.num_replays
        for prompt, [out] in zip(prompts, outs):
            assert out.token_ids == ref.generate(prompt)
    finally:
        engine.shutdown()
