"""Weight-only quantization of the native runner: packed kernels, a quantized tiny model,
and the WEIGHT_QUANT flag's resolution."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from backend.batch import build_forward_batch
from backend.sglang.kernels import torch_ops
from backend.sglang.layers import Linear
from backend.sglang.quant import (
    KERNEL_DTYPE,
    int4_fits,
    quantize_head_weight,
    quantize_weight,
    resolve_weight_quant,
)
from backend.sglang.runner import NativeRunner
from config import ConfigError, load_config

CPU = torch.device("cpu")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


@pytest.mark.parametrize(("method", "shape"), [
    ("int8", (48, 64)),
    ("int4", (48, 64)),
    ("int4", (40, 96)),  # 40 rows: int4 cannot pack, falls back to int8
    ("int8", (24, 40)),  # an input width off torch's int8 kernel's blocks of 16
    ("int4", (40, 72)),  # (falls back to int8 with that width too)
])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_linear_matches_its_dequantized_weight(
    method: str, shape: tuple[int, int], rows: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator) * 0.05
    x = torch.randn(rows, shape[1], generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    packed = quantize_weight(weight, method)
    expected_method = "int4" if method == "int4" and int4_fits(*shape) else "int8"
    assert packed.method == expected_method
    dequantized = packed.dequantize()
    step = weight.abs().max() / (7.5 if expected_method == "int4" else 127)
    assert (dequantized - weight).abs().max() <= step * 0.51 + 1e-3
    out = packed.linear(x, bias)
    reference = _bf16(x) @ dequantized.t() + bias
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, reference, atol=0.03, rtol=0.01)


def test_int4_recovers_a_weight_already_on_a_4bit_grid() -> None:
    """Groups using only some of 16 levels (as GGUF Q4_1 weights do) come back exactly,
    up to the bfloat16 rounding of scale and zero."""
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(2, 12, (32, 64), generator=generator).float()
    weight = levels * 0.01 - 0.05
    dequantized = quantize_weight(weight, "int4").dequantize()
    assert (dequantized - weight).abs().max() < 0.01 * 0.1


def test_head_weight_multiplies_with_int8_activations() -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(200, 64, generator=generator) * 0.05
    x = torch.randn(3, 64, generator=generator) * torch.linspace(0.1, 4.0, 64)
    head = quantize_head_weight(weight, "int8")
    assert head.method == "int8" and head.int8_activations
    out = head.matmul(x)
    assert out.dtype == torch.float32 and out.shape == (3, 200)
    row_steps = x.abs().amax(dim=-1, keepdim=True) / 127
    x_rounded = torch.round(x / row_steps) * row_steps
    torch.testing.assert_close(out, x_rounded @ head.dequantize().t(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, x @ weight.t(), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="int8"):
        quantize_head_weight(weight, "int4")


def test_linear_quantize_drops_the_float_weight() -> None:
    layer = Linear(64, 32, bias=False, ops=torch_ops, dtype=torch.float32, device=CPU)
    torch.nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(3, 64)
    before = layer(x)
    layer.quantize("int8")
    assert layer.weight.numel() == 0
    out = layer(x)
    assert out.dtype == KERNEL_DTYPE
    torch.testing.assert_close(out.float(), before, atol=0.02, rtol=0.02)
    buffer = torch.empty(3, 32, dtype=KERNEL_DTYPE)
    assert layer(x, out=buffer).data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, out)
    with pytest.raises(RuntimeError):
        layer.quantize("int8")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LlamaConfig]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama-quant")
    model.save_pretrained(folder)
    return str(folder), config


def _greedy_run(runner: NativeRunner, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill, then `steps` decode steps; the logits of every step."""
    slots = list(range(1, len(prompt) + steps + 1))
    batch = build_forward_batch([prompt], [0], [slots[: len(prompt)]], [True], CPU)
    logits = [runner.forward(batch)[0]]
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        n = len(tokens)
        batch = build_forward_batch([[tokens[-1]]], [n - 1], [slots[:n]], [True], CPU)
        logits.append(runner.forward(batch)[0])
    return logits


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_tiny_model_is_close_to_float32(
    tiny_llama: tuple[str, LlamaConfig], method: str
) -> None:
    folder, config = tiny_llama
    exact = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64)
    packed = NativeRunner(folder, config, dtype=torch.float32, device=CPU, num_kv_slots=64,
                          weight_quant=method)
    head = packed.model.tied_head
    assert head is not None and head.method == "int8" and head.int8_activations
    assert all(layer.quantized is not None for layer in packed.model.decoder_linears())
    prompt = [5, 17, 99, 3, 42, 7, 200, 11]
    exact_logits = _greedy_run(exact, prompt, steps=4)
    packed_logits = _greedy_run(packed, prompt, steps=4)
    assert len(packed_logits) == 5
    for ours, reference in zip(packed_logits, exact_logits):
        assert ours.dtype == torch.float32 and ours.shape == (config.vocab_size,)
        spread = reference.max() - reference.min()
        assert (ours - reference).abs().max() < 0.1 * spread


@pytest.mark.parametrize(("flag", "dtype_flag", "device", "expected"), [
    ("auto", "auto", "cpu", "int8"),
    ("auto", "bfloat16", "cpu", "int8"),
    ("auto", "float32", "cpu", "none"),
    ("auto", "auto", "cuda", "none"),
    ("auto", "auto", "mps", "none"),
    ("int8", "float32", "cpu", "int8"),
    ("none", "auto", "cpu", "none"),
    ("none", "auto", "cuda", "none"),
])
def test_resolve_weight_quant(flag: str, dtype_flag: str, device: str, expected: str) -> None:
    assert resolve_weight_quant(flag, dtype_flag, torch.device(device)) == expected


def test_explicit_quant_off_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="WEIGHT_QUANT"):
        resolve_weight_quant("int4", "auto", torch.device("cuda"))


def test_weight_quant_flag_parses() -> None:
    assert load_config({}).weight_quant == "auto"
    assert load_config({"WEIGHT_QUANT": "INT4"}).weight_quant == "int4"
    with pytest.raises(ConfigError, match="WEIGHT_QUANT"):
        load_config({"WEIGHT_QUANT": "fp8"})
