"""Shared fixtures: tiny random models with the real SmolLM2 tokenizer, and the embedded model.

`tiny_model_factory(arch)` returns a folder holding a 2-layer float32 model of that
architecture ("llama", "qwen2", "qwen3", "mistral") plus the SmolLM2 tokenizer (so its
vocabulary is the tokenizer's 49,152 tokens). `smollm2_dir` is the embedded
SmolLM2-135M-Instruct converted to safetensors once per run (into MINISGL_TEST_CACHE when
set, else ~/.cache/mini-sglang when it already holds a converted copy, else a session tmp).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton picks interpreter or compiler at first import (transformers imports it early):
    # on CPU, interpret, so the Triton kernel tests run against the torch reference.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gpt_neox")
_USER_CACHE = Path("~/.cache/mini-sglang").expanduser()


def _tiny_config(arch: str, vocab_size: int) -> Any:
    from transformers import (
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "phi3":  # no native implementation: served by the transformers runner
        return Phi3Config(**common)
    if arch == "gpt_neox":
        del common["num_key_value_heads"], common["pad_token_id"], common["tie_word_embeddings"]
        return GPTNeoXConfig(**common)
    raise ValueError(f"no tiny config for {arch!r}; known: {', '.join(TINY_ARCHS)}")


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """The embedded SmolLM2 tokenizer (ChatML template, eos <|im_end|>), read from the GGUF
    (or from the folder MINISGL_TEST_TOKENIZER names, where the GGUF package is absent)."""
    from backend.loader import embedded_tokenizer

    folder = os.environ.get("MINISGL_TEST_TOKENIZER")
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Any
) -> Callable[[str], str]:
    """`factory(arch) -> folder` of a tiny random float32 model, built once per arch."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, str] = {}

    def factory(arch: str) -> str:
        if arch not in built:
            folder = root / arch
            torch.manual_seed(0)
            config = _tiny_config(arch, len(smollm2_tokenizer))
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.save_pretrained(str(folder))
            smollm2_tokenizer.save_pretrained(str(folder))
            built[arch] = str(folder)
        return built[arch]

    return factory


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """MODEL_CACHE_DIR for tests that need the embedded model converted."""
    from backend.loader import COMPLETE_MARKER, EMBEDDED_DIR_NAME

    if os.environ.get("MINISGL_TEST_CACHE"):
        return os.environ["MINISGL_TEST_CACHE"]
    if (_USER_CACHE / EMBEDDED_DIR_NAME / COMPLETE_MARKER).is_file():
        return str(_USER_CACHE)
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def smollm2_dir(model_cache_dir: str) -> str:
    """The embedded SmolLM2-135M-Instruct as a converted safetensors folder."""
    from backend.loader import embedded_model_dir
    from config import load_config

    return embedded_model_dir(load_config({}, model_cache_dir=model_cache_dir))
