"""The compiled CPU decoder (backend/sglang/kernels/cpu/decoder.c) against torch ops.

Both sides run the same int8 weights: the reference is the float32 torch model with every
decoder matmul set to the dequantized int8 weight, and both share one float32 LM head, so
they differ only by the kernel's rounding (float32 sums, and activations carried as int16
per row into the integer matmuls: ~1e-5 of each row's largest value). They must agree on
prefill, decode, mixed batches and extends over a cached prefix.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from backend.batch import ForwardBatch, build_forward_batch
from backend.sglang.cpu_decoder import CpuDecoder, CpuKernelUnavailable, find_compiler
from backend.sglang.runner import NativeRunner
from config import ConfigError

CPU = torch.device("cpu")
NATIVE_ARCHS = ("llama", "qwen2", "qwen3", "mistral")

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="needs a C compiler")


def _runners(folder: str, cache_dir: Path) -> tuple[NativeRunner, NativeRunner, CpuDecoder]:
    """(int8 runner, float32 runner on its dequantized weights, compiled decoder)."""
    config = AutoConfig.from_pretrained(folder)
    packed = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=256,
                          weight_quant="int8")
    exact = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=256)
    generator = torch.Generator().manual_seed(0)
    packed_params = dict(packed.model.named_parameters())
    with torch.no_grad():
        for name, param in exact.model.named_parameters():
            if param.dim() == 1:  # norms and biases: off their trivial initial values
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
                packed_params[name].copy_(param)
        for ours, theirs in zip(exact.model.decoder_linears(), packed.model.decoder_linears()):
            assert theirs.quantized is not None
            ours.weight.copy_(theirs.quantized.dequantize())
    # One float32 head for both: the int8 head re-quantizes its input, which would turn
    # rounding-level differences of the hidden state into whole int8 steps.
    packed.model.lm_head = exact.model.lm_head
    packed.model.tied_head = None
    return packed, exact, CpuDecoder(packed.model, packed.kv_pool, str(cache_dir))


def _batch(prompts: list[list[int]], prefix_lens: list[int], slots: list[list[int]],
           sample: list[bool] | None = None) -> ForwardBatch:
    return build_forward_batch(prompts, prefix_lens, slots, sample or [True] * len(prompts), CPU)


def _assert_same_logits(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    tolerance = 1e-3 * (reference.max() - reference.min()).item()
    torch.testing.assert_close(ours, reference, atol=tolerance, rtol=0)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance  # rows whose argmax rounding can't flip
    assert clear.any()
    assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])


def _odd_shaped_llama(folder: Path) -> str:
    """Sizes off the kernel's vector and tile widths: hidden 72, head_dim 18, 100 MLP rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=100,
                         max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(folder))
    return str(folder)


def _wide_mlp_llama(folder: Path) -> str:
    """An MLP 16,384 wide (Llama-3-8B's is 14,336): the down projection sums that many
    products per output, past what one int32 holds at full int16 resolution."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=16384,
                         max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(folder))
    return str(folder)


SHAPED_MODELS = {"llama-odd-shapes": _odd_shaped_llama, "llama-wide-mlp": _wide_mlp_llama}


@pytest.mark.parametrize("arch", [*NATIVE_ARCHS, *SHAPED_MODELS])
def test_compiled_decoder_matches_torch_ops(
    arch: str, tiny_model_factory: Callable[[str], str], tmp_path: Path
) -> None:
    folder = (SHAPED_MODELS[arch](tmp_path / "model") if arch in SHAPED_MODELS
              else tiny_model_factory(arch))
    packed, exact, decoder = _runners(folder, tmp_path / "kernels")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 2000, (n,), generator=generator).tolist() for n in (5, 17, 33)]
    slots = [list(range(1, 6)), list(range(10, 27)), list(range(40, 73))]

    def both(batch: ForwardBatch) -> torch.Tensor:
        with torch.inference_mode():
            reference = exact.model(batch.input_ids, batch.positions, batch, exact.kv_pool)
            ours = decoder.forward(batch)
        _assert_same_logits(ours, reference)
        return ours

    # Prefill of three prompts; the middle one is a chunk that samples nothing.
    logits = both(_batch(prompts, [0, 0, 0], slots, [True, False, True]))
    pools = ((packed.kv_pool.k, exact.kv_pool.k), (packed.kv_pool.v, exact.kv_pool.v))
    for ours, theirs in pools:
        for layer in range(len(ours)):
            torch.testing.assert_close(ours[layer][1:73], theirs[layer][1:73], atol=1e-3,
                                       rtol=1e-3)
    # Mixed step: two decodes, and a new request extending the first 10 tokens of
    # prompt 2 (a prefix-cache hit) by 6 tokens.
    next_tokens = [[int(t)] for t in logits.argmax(-1)]
    extend = prompts[1][10:16]
    batch = _batch(
        [next_tokens[0], extend, next_tokens[1]],
        [5, 10, 33],
        [slots[0] + [6], slots[1][:10] + list(range(100, 106)), slots[2] + [73]],
    )
    both(batch)
    # Decode steps of all three requests together.
    for step in range(3):
        tokens = [[(7 * step + b) % 1000 + 3] for b in range(3)]
        lens = [6 + step, 16 + step, 34 + step]
        batch_slots = [
            slots[0] + list(range(6, 8 + step)),
            slots[1][:10] + list(range(100, 107 + step)),
            slots[2] + list(range(73, 75 + step)),
        ]
        both(_batch(tokens, lens, batch_slots))


def test_runner_uses_the_compiled_decoder_for_int8(
    tiny_model_factory: Callable[[str], str], tmp_path: Path
) -> None:
    folder = tiny_model_factory("qwen3")
    config = AutoConfig.from_pretrained(folder)
    runner = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64,
                          weight_quant="int8", cpu_kernel="auto", kernel_cache_dir=str(tmp_path))
    assert runner.cpu_decoder is not None
    assert list(tmp_path.glob("decoder-*.so"))
    batch = _batch([[5, 6, 7, 8]], [0], [[1, 2, 3, 4]])
    logits = runner.forward(batch)
    assert logits.shape == (1, config.vocab_size) and torch.isfinite(logits).all()


def test_float_weights_fall_back_to_torch_ops_or_fail_when_forced(
    tiny_model_factory: Callable[[str], str], tmp_path: Path
) -> None:
    folder = tiny_model_factory("llama")
    config = AutoConfig.from_pretrained(folder)
    runner = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64,
                          cpu_kernel="auto", kernel_cache_dir=str(tmp_path))
    assert runner.cpu_decoder is None
    with pytest.raises(ConfigError, match="CPU_KERNEL=c: .*int8"):
        NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64,
                     cpu_kernel="c", kernel_cache_dir=str(tmp_path))


def test_a_missing_compiler_is_reported(
    tiny_model_factory: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tiny_model_factory("llama")
    config = AutoConfig.from_pretrained(folder)
    runner = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64,
                          weight_quant="int8")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(CpuKernelUnavailable, match="no C compiler"):
        CpuDecoder(runner.model, runner.kv_pool, str(tmp_path / "fresh"))
