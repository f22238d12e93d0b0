"""The native paged runner against transformers on tiny random models (CPU, float32)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from backend.batch import ForwardBatch, build_forward_batch
from backend.kv_pool import KVPool
from backend.sglang.kernels import load_kernel_set, torch_ops
from backend.sglang.models import MODEL_REGISTRY, get_model_class
from backend.sglang.runner import NativeRunner, UnsupportedModelError

CPU = torch.device("cpu")
VOCAB = 512
NUM_SLOTS = 160
ATOL = 1e-4

COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=2,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

MODEL_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**COMMON),
    "llama_tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
    "llama3_rope": LlamaConfig(**{**COMMON, "rope_scaling": LLAMA3_SCALING,
                                  "rope_theta": 500000.0}),
    "qwen2": Qwen2Config(**COMMON),
    "qwen3": Qwen3Config(**COMMON, head_dim=32),
    "mistral": MistralConfig(**COMMON, sliding_window=None),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """HF zeroes biases and sets norms to 1; perturb them so the test can see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)


@pytest.fixture(scope="module", params=sorted(MODEL_CONFIGS))
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(HF reference model, its saved folder) for each architecture variant."""
    torch.manual_seed(0)
    config = MODEL_CONFIGS[request.param]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed=1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.fixture(scope="module")
def runner_and_ref(tiny_model):
    model, folder = tiny_model
    runner = NativeRunner(folder, model.config, dtype=torch.float32, device=CPU,
                          num_kv_slots=NUM_SLOTS)
    return runner, model


def hf_last_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()


@dataclass
class Requests:
    """Hand-out of shuffled, non-contiguous pool slots to requests, as the scheduler would."""

    free: list[int]
    slots: dict[str, list[int]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def shuffled(cls, seed: int, num_slots: int = NUM_SLOTS) -> Requests:
        free = list(range(1, num_slots + 1))
        random.Random(seed).shuffle(free)
        return cls(free)

    def step(self, new: dict[str, list[int]], sample: dict[str, bool] | None = None
             ) -> ForwardBatch:
        """A batch adding `new[name]` tokens to each named request."""
        prefix_lens, kv_slots = [], []
        for name, ids in new.items():
            self.tokens.setdefault(name, [])
            self.slots.setdefault(name, [])
            prefix_lens.append(len(self.tokens[name]))
            self.tokens[name] += ids
            self.slots[name] += [self.free.pop() for _ in ids]
            kv_slots.append(list(self.slots[name]))
        mask = [True if sample is None else sample.get(n, True) for n in new]
        return build_forward_batch(list(new.values()), prefix_lens, kv_slots, mask, CPU)


def random_tokens(n: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(VOCAB) for _ in range(n)]


# ---------------------------------------------------------------- model vs transformers


def test_full_prefill_matches_hf(runner_and_ref) -> None:
    runner, model = runner_and_ref
    prompt = random_tokens(23, seed=1)
    logits = runner.forward(Requests.shuffled(0).step({"a": prompt}))
    assert logits.dtype == torch.float32
    assert logits.shape == (1, VOCAB)
    torch.testing.assert_close(logits[0], hf_last_logits(model, prompt), atol=ATOL, rtol=0)


def test_extend_over_cached_prefix_matches_hf(runner_and_ref) -> None:
    runner, model = runner_and_ref
    prompt = random_tokens(30, seed=2)
    requests = Requests.shuffled(1)
    first = runner.forward(requests.step({"a": prompt[:13]}))
    torch.testing.assert_close(first[0], hf_last_logits(model, prompt[:13]), atol=ATOL, rtol=0)
    rest = runner.forward(requests.step({"a": prompt[13:]}))
    torch.testing.assert_close(rest[0], hf_last_logits(model, prompt), atol=ATOL, rtol=0)


def test_decode_batch_of_different_lengths_matches_hf(runner_and_ref) -> None:
    runner, model = runner_and_ref
    prompts = {"a": random_tokens(5, 3), "b": random_tokens(12, 4), "c": random_tokens(18, 5)}
    requests = Requests.shuffled(2)
    runner.forward(requests.step({name: ids[:-1] for name, ids in prompts.items()}))
    batch = requests.step({name: ids[-1:] for name, ids in prompts.items()})
    assert batch.is_decode
    logits = runner.forward(batch)
    for row, ids in enumerate(prompts.values()):
        torch.testing.assert_close(logits[row], hf_last_logits(model, ids), atol=ATOL, rtol=0)


def test_equal_length_decode_steps_match_hf(runner_and_ref) -> None:
    runner, model = runner_and_ref
    prompts = {"a": random_tokens(9, 6), "b": random_tokens(9, 7)}
    requests = Requests.shuffled(3)
    runner.forward(requests.step(prompts))
    for step in range(3):
        new = {name: [(step * 31 + len(name)) % VOCAB] for name in prompts}
        logits = runner.forward(requests.step(new))
        for row, name in enumerate(prompts):
            expected = hf_last_logits(model, requests.tokens[name])
            torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)


def test_mixed_batch_matches_hf(runner_and_ref) -> None:
    """Decodes, a fresh prefill, a prefix extend and a non-sampling chunk in one step."""
    runner, model = runner_and_ref
    full = {name: random_tokens(n, seed) for name, n, seed in
            (("dec1", 7, 8), ("dec2", 15, 9), ("fresh", 11, 10), ("chunked", 25, 11),
             ("mid", 20, 12))}
    requests = Requests.shuffled(4)
    runner.forward(requests.step({"dec1": full["dec1"][:-1], "dec2": full["dec2"][:-1],
                                  "chunked": full["chunked"][:10]}))
    batch = requests.step(
        {"dec1": full["dec1"][-1:], "fresh": full["fresh"], "dec2": full["dec2"][-1:],
         "chunked": full["chunked"][10:], "mid": full["mid"][:8]},
        sample={"mid": False},
    )
    logits = runner.forward(batch)
    assert logits.shape == (4, VOCAB)
    for row, name in enumerate(("dec1", "fresh", "dec2", "chunked")):
        torch.testing.assert_close(logits[row], hf_last_logits(model, full[name]), atol=ATOL,
                                   rtol=0)
    rest = runner.forward(requests.step({"mid": full["mid"][8:]}))
    torch.testing.assert_close(rest[0], hf_last_logits(model, full["mid"]), atol=ATOL, rtol=0)


class SplitInputOps:
    """The torch kernel set, except that `linear_into_norm` hands back its product as a
    `SplitSum` of two partial products over halves of the input dim, as the CUDA set's
    split-K layers do, so the layers' path for partial sums runs on the CPU."""

    def __init__(self) -> None:
        self.splits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(torch_ops, name)

    def linear_into_norm(self, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor | torch_ops.SplitSum:
        if bias is not None:
            return torch_ops.linear(x, weight, bias)
        self.splits += 1
        half = x.shape[1] // 2
        partials = torch.stack([x[:, :half].float() @ weight[:, :half].float().t(),
                                x[:, half:].float() @ weight[:, half:].float().t()])
        return torch_ops.SplitSum(partials, x.dtype)


def test_split_sums_between_layers_match_hf(tiny_model) -> None:
    """With o_proj and down_proj handing partial sums to the norms after them (and to the
    head's row selection of a mixed step), a mixed batch and a decode step still match
    transformers."""
    model, folder = tiny_model
    runner = NativeRunner(folder, model.config, dtype=torch.float32, device=CPU,
                          num_kv_slots=NUM_SLOTS)
    split_ops = SplitInputOps()
    for module in runner.model.modules():
        if hasattr(module, "ops"):
            setattr(module, "ops", split_ops)  # noqa: B010 - not an nn.Module attribute
    full = {name: random_tokens(n, seed) for name, n, seed in
            (("dec", 9, 21), ("fresh", 12, 22), ("chunk", 14, 23))}
    requests = Requests.shuffled(5)
    runner.forward(requests.step({"dec": full["dec"][:-1], "chunk": full["chunk"][:6]}))
    logits = runner.forward(requests.step(
        {"dec": full["dec"][-1:], "fresh": full["fresh"], "chunk": full["chunk"][6:]},
        sample={"chunk": False}))
    for row, name in enumerate(("dec", "fresh")):
        torch.testing.assert_close(logits[row], hf_last_logits(model, full[name]), atol=ATOL,
                                   rtol=0)
    full["dec"] += [3]
    full["fresh"] += [5]
    decoded = runner.forward(requests.step({"dec": [3], "fresh": [5]}))
    for row, name in enumerate(("dec", "fresh")):
        torch.testing.assert_close(decoded[row], hf_last_logits(model, full[name]), atol=ATOL,
                                   rtol=0)
    decoder = runner.model.config
    unbiased = (not decoder.o_bias) + (not decoder.mlp_bias)
    assert split_ops.splits == 3 * unbiased * decoder.num_layers > 0


def test_logits_into_a_buffer_equal_the_plain_head(runner_and_ref) -> None:
    """The LM head writing into a caller's buffer (the decode graphs' static logits), tied
    to the embeddings or not, gives bit for bit the logits it returns otherwise."""
    runner, _ = runner_and_ref
    model = runner.model
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    buffer = torch.full((4, model.config.vocab_size), float("nan"))
    result = model.logits(hidden, out=buffer[:3])
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:3], model.logits(hidden))
    assert buffer[3].isnan().all()


def test_model_info(runner_and_ref) -> None:
    runner, model = runner_and_ref
    info = runner.info
    assert info.architecture == model.config.architectures[0]
    assert (info.vocab_size, info.num_layers, info.num_kv_heads) == (VOCAB, 2, 2)
    assert info.head_dim == (32 if info.architecture == "Qwen3ForCausalLM" else 16)
    assert info.max_context_len == 256
    assert info.eos_token_ids == (2,)
    assert runner.num_kv_slots == NUM_SLOTS
    assert runner.kv_pool.k[0].shape == (NUM_SLOTS + 1, 2, info.head_dim)


# ---------------------------------------------------------------- runner construction


def _save_config(config: PretrainedConfig, folder: Path, arch: str) -> PretrainedConfig:
    config.architectures = [arch]
    config.save_pretrained(folder)
    return config


def test_dummy_weights_build_run_and_are_seeded(tmp_path: Path) -> None:
    config = _save_config(LlamaConfig(**COMMON, tie_word_embeddings=True), tmp_path,
                          "LlamaForCausalLM")
    prompt = random_tokens(10, seed=13)

    def logits(seed: int) -> torch.Tensor:
        runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU,
                              num_kv_slots=32, load_format="dummy", seed=seed)
        norm = runner.model.model.norm.weight
        assert torch.equal(norm, torch.ones_like(norm))
        return runner.forward(Requests.shuffled(0, num_slots=32).step({"a": prompt}))

    first, again, other = logits(0), logits(0), logits(1)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_bfloat16_runner_tracks_float32(tiny_model) -> None:
    model, folder = tiny_model
    prompt = random_tokens(16, seed=14)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = NativeRunner(folder, model.config, dtype=dtype, device=CPU, num_kv_slots=32)
        requests = Requests.shuffled(0, num_slots=32)
        logits[dtype] = runner.forward(requests.step({"a": prompt}))[0]
    assert logits[torch.bfloat16].dtype == torch.bfloat16  # the sampler widens where it must
    torch.testing.assert_close(logits[torch.bfloat16].float(), logits[torch.float32], atol=0.05,
                               rtol=0)


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    config = _save_config(LlamaConfig(**COMMON), tmp_path, "GPT2LMHeadModel")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU, num_kv_slots=8,
                     load_format="dummy")
    assert get_model_class("GPT2LMHeadModel") is None
    assert set(MODEL_REGISTRY) == {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                   "MistralForCausalLM"}


def test_eos_ids_merge_config_and_generation_config(tmp_path: Path) -> None:
    config = _save_config(LlamaConfig(**COMMON), tmp_path, "LlamaForCausalLM")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU,
                          num_kv_slots=8, load_format="dummy")
    assert runner.info.eos_token_ids == (2, 7, 9)


def test_mistral_sliding_window_caps_context(tmp_path: Path, caplog) -> None:
    config = _save_config(MistralConfig(**COMMON, sliding_window=64), tmp_path,
                          "MistralForCausalLM")
    runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU,
                          num_kv_slots=8, load_format="dummy")
    assert runner.info.max_context_len == 64
    assert "sliding window" in caplog.text


@pytest.mark.parametrize(("window_layers", "context"), [(2, 128), (1, 64)])
def test_a_sliding_window_caps_context_only_where_a_layer_slides(
    tmp_path: Path, window_layers: int, context: int
) -> None:
    """Qwen2 slides only in the layers from `max_window_layers` on: a config whose window
    layers cover them all has full attention everywhere and its whole context."""
    config = _save_config(
        Qwen2Config(**{**COMMON, "max_position_embeddings": 128}, use_sliding_window=True,
                    sliding_window=64, max_window_layers=window_layers),
        tmp_path, "Qwen2ForCausalLM")
    assert config.num_hidden_layers == 2
    runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU,
                          num_kv_slots=8, load_format="dummy")
    assert runner.info.max_context_len == context


def test_missing_checkpoint_tensor_is_an_error(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, folder = tiny_model
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="k_proj|qkv_proj"):
        NativeRunner(str(tmp_path), model.config, dtype=torch.float32, device=CPU,
                     num_kv_slots=8)


# ---------------------------------------------------------------- torch ops


def test_kernel_set_registry() -> None:
    assert load_kernel_set("torch") is torch_ops
    with pytest.raises(ValueError, match="unknown kernel set"):
        load_kernel_set("nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_match_hf(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    reference = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.normal_()
    x = torch.randn(5, 64).to(dtype)
    residual = torch.randn(5, 64).to(dtype)
    assert torch.equal(torch_ops.rms_norm(x, reference.weight, 1e-5), reference(x))
    normed, new_residual = torch_ops.fused_add_rms_norm(x, residual, reference.weight, 1e-5)
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, reference(x + residual))


def test_silu_and_mul() -> None:
    x = torch.randn(3, 2 * 24)
    expected = F.silu(x[:, :24]) * x[:, 24:]
    assert torch.equal(torch_ops.silu_and_mul(x), expected)


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING],
    ids=["default", "linear", "llama3"],
)
def test_rope_matches_hf(scaling: dict | None) -> None:
    head_dim, theta = 32, 500000.0
    options: dict[str, Any] = {"hidden_size": 128, "rope_theta": theta, "rope_scaling": scaling}
    config = LlamaConfig(**{**COMMON, **options})
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 3, 17, 64, 200, 255])
    q = torch.randn(len(positions), 4, head_dim)
    k = torch.randn(len(positions), 2, head_dim)
    cos, sin = rotary(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos,
                                        sin)
    cache = torch_ops.build_rope_cache(head_dim, 256, theta, scaling, CPU)
    q_out, k_out = torch_ops.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1), atol=1e-6, rtol=0)


def test_rope_tables_follow_the_positions_tensor() -> None:
    """The per-step tables are reused for the same positions tensor, rebuilt for another."""
    head_dim = 16
    cache = torch_ops.build_rope_cache(head_dim, 64, 10000.0, None, CPU)
    q = torch.randn(3, 2, head_dim)
    k = torch.randn(3, 1, head_dim)
    first, second = torch.tensor([0, 5, 9]), torch.tensor([1, 30, 63])
    q1, k1 = torch_ops.apply_rotary(q, k, first, cache)
    q1_again, _ = torch_ops.apply_rotary(q, k, first, cache)
    q2, k2 = torch_ops.apply_rotary(q, k, second, cache)
    for positions, q_out, k_out in ((first, q1, k1), (second, q2, k2)):
        cos, sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
        for x, out in ((q, q_out), (k, k_out)):
            x1, x2 = x.chunk(2, dim=-1)
            expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(q1_again, q1, atol=0, rtol=0)


@pytest.mark.parametrize("consecutive", [True, False])
def test_single_decode_attention_over_consecutive_or_scattered_slots(consecutive: bool) -> None:
    """One decode request reads its KV as a view when its slots are consecutive; either way
    the result is dense attention over its keys."""
    torch.manual_seed(3)
    num_heads, num_kv_heads, head_dim, length = 6, 2, 8, 11
    pool = KVPool(1, 32, num_kv_heads, head_dim, torch.float32, CPU)
    slots = list(range(7, 7 + length)) if consecutive else random.Random(2).sample(
        range(1, 33), length)
    k = torch.randn(length, num_kv_heads, head_dim)
    v = torch.randn(length, num_kv_heads, head_dim)
    pool.store(0, torch.tensor(slots), k, v)
    batch = build_forward_batch([[0]], [length - 1], [slots], [True], CPU)
    q = torch.randn(1, num_heads, head_dim)
    out = torch_ops.paged_attention(q, pool.k[0], pool.v[0], batch, 0.25, num_kv_heads)
    torch.testing.assert_close(out, _dense_causal_attention(q, k, v, 0.25), atol=1e-5, rtol=0)


def test_unknown_rope_type_is_not_implemented() -> None:
    with pytest.raises(NotImplementedError, match="yarn"):
        torch_ops.build_rope_cache(16, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0}, CPU)


def test_paged_attention_matches_dense_reference() -> None:
    """Shuffled slots, GQA, decode + prefix extend + fresh prefill in one batch."""
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim = 4, 2, 8
    pool = KVPool(1, 64, num_kv_heads, head_dim, torch.float32, CPU)
    requests = Requests(free=random.Random(5).sample(range(1, 65), 64))
    k_all = {n: torch.randn(length, num_kv_heads, head_dim) for n, length in
             (("dec", 9), ("ext", 12), ("new", 6))}
    v_all = {n: torch.randn_like(k) for n, k in k_all.items()}
    cached = {"dec": 8, "ext": 5}
    requests.step({n: [0] * c for n, c in cached.items()})
    for n, c in cached.items():
        pool.store(0, torch.tensor(requests.slots[n]), k_all[n][:c], v_all[n][:c])
    new_lens = {"dec": 1, "ext": 7, "new": 6}
    batch = requests.step({n: [0] * length for n, length in new_lens.items()})
    pool.store(0, batch.out_slots,
               torch.cat([k_all[n][-new_lens[n]:] for n in new_lens]),
               torch.cat([v_all[n][-new_lens[n]:] for n in new_lens]))
    q = torch.randn(batch.num_tokens, num_heads, head_dim)
    out = torch_ops.paged_attention(q, pool.k[0], pool.v[0], batch, 0.3, num_kv_heads)
    row = 0
    for n, length in new_lens.items():
        expected = _dense_causal_attention(q[row : row + length], k_all[n], v_all[n], 0.3)
        torch.testing.assert_close(out[row : row + length], expected, atol=1e-5, rtol=0)
        row += length


def _dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    prefix = k.shape[0] - q.shape[0]
    allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(prefix)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)
