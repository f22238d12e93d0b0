"""HFRunner (transformers model on our paged KV pool) against the plain HF model, and HFBaseline."""

from __future__ import annotations

import json
import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from backend.batch import build_forward_batch
from backend.hf.baseline import HFBaseline
from backend.hf.runner import HFRunner, UnsupportedModelError
from backend.loader import resolve_model
from config import load_config

CPU = torch.device("cpu")
ATOL = 1e-4


def _source(folder: str, load_format: str = "auto") -> Any:
    return resolve_model(load_config({}, model_local_dir=folder, load_format=load_format))


def _runner(folder: str, num_kv_slots: int = 64, **kwargs: Any) -> HFRunner:
    return HFRunner(
        _source(folder, kwargs.get("load_format", "auto")),
        dtype=torch.float32,
        device=CPU,
        num_kv_slots=num_kv_slots,
        **kwargs,
    )


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request: pytest.FixtureRequest, tiny_model_factory: Callable[[str], str]) -> Any:
    """(runner, reference HF model) on the same tiny weights."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_factory(request.param)
    reference = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return _runner(folder), reference


@torch.inference_mode()
def _reference_last_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def test_full_prefill_matches_hf(tiny: Any) -> None:
    runner, reference = tiny
    rng = random.Random(1)
    tokens = _random_tokens(rng, 9)
    slots = rng.sample(range(1, runner.num_kv_slots + 1), len(tokens))
    batch = build_forward_batch([tokens], [0], [slots], [True], CPU)
    logits = runner.forward(batch)
    assert logits.shape == (1, runner.info.vocab_size)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(
        logits[0], _reference_last_logits(reference, tokens), atol=ATOL, rtol=0
    )


def test_prefix_then_extend_matches_hf(tiny: Any) -> None:
    runner, reference = tiny
    rng = random.Random(2)
    tokens = _random_tokens(rng, 11)
    slots = rng.sample(range(1, runner.num_kv_slots + 1), len(tokens))
    first = build_forward_batch([tokens[:6]], [0], [slots[:6]], [False], CPU)
    assert runner.forward(first).shape == (0, runner.info.vocab_size)
    second = build_forward_batch([tokens[6:]], [6], [slots], [True], CPU)
    logits = runner.forward(second)
    torch.testing.assert_close(
        logits[0], _reference_last_logits(reference, tokens), atol=ATOL, rtol=0
    )


def test_decode_batch_with_shuffled_slots_matches_hf(tiny: Any) -> None:
    runner, reference = tiny
    rng = random.Random(3)
    prompts = [_random_tokens(rng, n) for n in (5, 8, 3)]
    free = rng.sample(range(1, runner.num_kv_slots + 1), runner.num_kv_slots)
    slots = [[free.pop() for _ in range(len(p) + 1)] for p in prompts]
    prefill = build_forward_batch(
        prompts, [0, 0, 0], [s[: len(p)] for s, p in zip(slots, prompts)], [True] * 3, CPU
    )
    prefill_logits = runner.forward(prefill)
    for row, prompt in enumerate(prompts):
        expected = _reference_last_logits(reference, prompt)
        torch.testing.assert_close(prefill_logits[row], expected, atol=ATOL, rtol=0)

    next_tokens = [int(t) for t in prefill_logits.argmax(-1)]
    decode = build_forward_batch(
        [[t] for t in next_tokens], [len(p) for p in prompts], slots, [True] * 3, CPU
    )
    assert decode.is_decode
    logits = runner.forward(decode)
    for row, (prompt, token) in enumerate(zip(prompts, next_tokens)):
        expected = _reference_last_logits(reference, prompt + [token])
        torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)


def test_mixed_extend_and_decode_batch_matches_hf(tiny: Any) -> None:
    runner, reference = tiny
    rng = random.Random(4)
    cached, fresh = _random_tokens(rng, 6), _random_tokens(rng, 4)
    free = rng.sample(range(1, runner.num_kv_slots + 1), 12)
    cached_slots, fresh_slots = free[:7], free[7:11]
    runner.forward(build_forward_batch([cached[:6]], [0], [cached_slots[:6]], [False], CPU))
    token = 7
    mixed = build_forward_batch(
        [fresh, [token]], [0, 6], [fresh_slots, cached_slots], [True, True], CPU
    )
    logits = runner.forward(mixed)
    torch.testing.assert_close(
        logits[0], _reference_last_logits(reference, fresh), atol=ATOL, rtol=0
    )
    expected = _reference_last_logits(reference, cached + [token])
    torch.testing.assert_close(logits[1], expected, atol=ATOL, rtol=0)


def test_sliding_window_matches_hf(
    tmp_path: Path, tiny_model_factory: Callable[[str], str]
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "mistral-window"
    shutil.copytree(tiny_model_factory("mistral"), folder)
    config = AutoConfig.from_pretrained(folder)
    config.sliding_window = 4
    config.save_pretrained(folder)
    runner = _runner(str(folder))
    reference = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rng = random.Random(5)
    tokens = _random_tokens(rng, 10)
    slots = rng.sample(range(1, 65), len(tokens))
    runner.forward(build_forward_batch([tokens[:7]], [0], [slots[:7]], [False], CPU))
    logits = runner.forward(build_forward_batch([tokens[7:]], [7], [slots], [True], CPU))
    torch.testing.assert_close(
        logits[0], _reference_last_logits(reference, tokens), atol=ATOL, rtol=0
    )


def test_model_info_and_pool(tiny: Any) -> None:
    runner, reference = tiny
    config = reference.config
    assert runner.info.num_layers == config.num_hidden_layers == 2
    assert runner.info.num_kv_heads == 2
    assert runner.info.head_dim == 16
    assert runner.info.vocab_size == 49152
    assert runner.info.max_context_len == 512
    assert 2 in runner.info.eos_token_ids
    assert runner.pool.k[0].shape == (runner.num_kv_slots + 1, 2, 16)


def test_dummy_weights_are_seeded(tmp_path: Path, tiny_model_factory: Callable[[str], str]) -> None:
    shutil.copy(Path(tiny_model_factory("qwen3")) / "config.json", tmp_path / "config.json")
    batch = build_forward_batch([[5, 6, 7]], [0], [[1, 2, 3]], [True], CPU)
    first = _runner(str(tmp_path), load_format="dummy", seed=1).forward(batch)
    again = _runner(str(tmp_path), load_format="dummy", seed=1).forward(batch)
    other = _runner(str(tmp_path), load_format="dummy", seed=2).forward(batch)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("arch", ["mamba", "falcon"])  # falcon: its own attention table
def test_model_without_attention_interface_is_rejected(tmp_path: Path, arch: str) -> None:
    from transformers import FalconConfig, FalconForCausalLM, MambaConfig, MambaForCausalLM

    if arch == "mamba":
        config = MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
        MambaForCausalLM(config).save_pretrained(str(tmp_path))
    else:
        falcon = FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2)
        FalconForCausalLM(falcon).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError):
        _runner(str(tmp_path))


def test_a_hybrid_model_with_state_outside_attention_is_rejected(tmp_path: Path) -> None:
    """Falcon-H1 runs Mamba beside attention in every layer: its attention goes through
    the pool, but the SSM state would be lost between steps, so the runner refuses it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "falcon_h1", vocab_size=512, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        max_position_embeddings=512, mamba_d_ssm=128, mamba_n_heads=16, mamba_d_state=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights of a trained model's scale: the state matters
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="keeps state outside attention"):
        _runner(str(tmp_path))


def test_longrope_caps_the_context_at_the_original(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers picks longrope's frequencies per forward from the longest position in
    it, switching at the original context: in one packed row a short request would take a
    long one's. The runner serves such a model only below that length."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "phi3", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                      "long_factor": [4.0] * 8, "original_max_position_embeddings": 32})
    config.save_pretrained(str(tmp_path))
    runner = _runner(str(tmp_path), load_format="dummy")
    assert runner.info.max_context_len == 32
    assert "switches its frequencies past 32 tokens" in caplog.text


def test_dynamic_ntk_keeps_the_declared_context(tmp_path: Path) -> None:
    """Dynamic NTK switches only past the declared context, which is never served."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    config.save_pretrained(str(tmp_path))
    assert _runner(str(tmp_path), load_format="dummy").info.max_context_len == 512


def _greedy_with_runner(runner: HFRunner, prompt: list[int], steps: int) -> list[int]:
    slots = list(range(1, len(prompt) + steps + 1))
    logits = runner.forward(build_forward_batch([prompt], [0], [slots[: len(prompt)]], [True], CPU))
    generated = [int(logits[0].argmax())]
    for _ in range(steps - 1):
        length = len(prompt) + len(generated)
        batch = build_forward_batch([[generated[-1]]], [length - 1], [slots[:length]], [True], CPU)
        generated.append(int(runner.forward(batch)[0].argmax()))
    return generated


def test_baseline_generate_batch_matches_runner_greedy(
    tiny_model_factory: Callable[[str], str],
) -> None:
    folder = tiny_model_factory("llama")
    baseline = HFBaseline(_source(folder), dtype=torch.float32, device=CPU)
    runner = _runner(folder)
    prompts = [[10, 11, 12, 13, 14], [20, 21]]
    outputs = baseline.generate_batch(prompts, max_new_tokens=6)
    assert [len(o) for o in outputs] == [6, 6]
    for prompt, output in zip(prompts, outputs):
        assert output == _greedy_with_runner(runner, prompt, 6)


def test_baseline_stream_yields_greedy_text(tiny_model_factory: Callable[[str], str]) -> None:
    folder = tiny_model_factory("qwen3")
    baseline = HFBaseline(_source(folder), dtype=torch.float32, device=CPU)
    prompt = [30, 31, 32, 33]
    expected_ids = baseline.generate_batch([prompt], max_new_tokens=8)[0]
    chunks = list(baseline.stream(prompt, max_new_tokens=8))
    expected_text = baseline.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert "".join(chunks) == expected_text
    assert len(chunks) >= 1


def test_baseline_ignore_eos_runs_past_a_declared_eos(
    tmp_path: Path, tiny_model_factory: Callable[[str], str]
) -> None:
    folder = tmp_path / "llama-eos"
    shutil.copytree(tiny_model_factory("llama"), folder)
    prompt = [40, 41, 42]
    free_run = HFBaseline(_source(str(folder)), dtype=torch.float32, device=CPU)
    tokens = free_run.generate_batch([prompt], max_new_tokens=6)[0]
    eos = tokens[2]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    baseline = HFBaseline(_source(str(folder)), dtype=torch.float32, device=CPU)
    assert eos in baseline.eos_token_ids
    assert baseline.generate_batch([prompt], max_new_tokens=6, ignore_eos=True)[0] == tokens
    stopped = baseline.generate_batch([prompt], max_new_tokens=6, ignore_eos=False)[0]
    assert stopped == tokens[: tokens.index(eos) + 1]


def test_baseline_greedy_ignores_the_models_own_penalties(
    tmp_path: Path, tiny_model_factory: Callable[[str], str]
) -> None:
    """A generation_config.json may ship repetition penalties and n-gram bans (instruct
    models do): the baseline's greedy is still plain greedy, as the runner's."""
    folder = tmp_path / "llama-penalties"
    shutil.copytree(tiny_model_factory("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 3.0, "no_repeat_ngram_size": 2, "min_new_tokens": 4}))
    baseline = HFBaseline(_source(str(folder)), dtype=torch.float32, device=CPU)
    prompt = [50, 51, 52, 50, 51]
    output = baseline.generate_batch([prompt], max_new_tokens=12)[0]
    assert output == _greedy_with_runner(_runner(str(folder)), prompt, 12)


def test_closing_a_stream_stops_its_generation(tiny_model_factory: Callable[[str], str]) -> None:
    baseline = HFBaseline(_source(tiny_model_factory("qwen3")), dtype=torch.float32, device=CPU)
    before = set(threading.enumerate())
    chunks = baseline.stream([30, 31, 32], max_new_tokens=5000, ignore_eos=True)
    next(chunks)
    chunks.close()
    started = [t for t in threading.enumerate() if t not in before]
    assert len(started) == 1
    started[0].join(timeout=5.0)
    assert not started[0].is_alive()


def test_auto_fallback_keeps_the_cpus_own_dtype(
    tiny_model_factory: Callable[[str], str],
) -> None:
    """DTYPE=auto picks float32 on CPU for the native int8 C decoder; a model the native
    runner lacks (phi3 here) falls back to transformers in the CPU's own dtype instead."""
    from backend.factory import create_runner
    from backend.loader import resolve_model
    from config import cpu_has_native_bf16, load_config

    config = load_config({"MODEL_LOCAL_DIR": tiny_model_factory("phi3"), "DEVICE": "cpu",
                          "KV_CACHE_CPU_TOKENS": "256"})
    runner = create_runner(config, resolve_model(config))
    assert isinstance(runner, HFRunner)
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert next(runner.model.parameters()).dtype == expected


def test_baseline_sampling_without_top_k_keeps_every_token(
    tiny_model_factory: Callable[[str], str],
) -> None:
    """top_k 0 means no top-k, as in the engine; left unset, transformers would apply 50."""
    baseline = HFBaseline(_source(tiny_model_factory("llama")), dtype=torch.float32, device=CPU)
    unfiltered = baseline._generate_kwargs(8, 0.8, 1.0, 0, False)["generation_config"]
    assert unfiltered.top_k == 0 and unfiltered.do_sample
    assert baseline._generate_kwargs(8, 0.8, 1.0, 5, False)["generation_config"].top_k == 5
    greedy = baseline._generate_kwargs(8, 0.0, 1.0, 0, False)["generation_config"]
    assert not greedy.do_sample
