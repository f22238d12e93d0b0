"""Native model registry, keyed by the HF architecture name in config.json."""

from __future__ import annotations

from backend.sglang.layers import CausalLM
from backend.sglang.models.llama import LlamaForCausalLM
from backend.sglang.models.mistral import MistralForCausalLM
from backend.sglang.models.qwen2 import Qwen2ForCausalLM
from backend.sglang.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architecture: str) -> type[CausalLM] | None:
    """The native class for `architecture`, or None when only the HF backend can run it."""
    return MODEL_REGISTRY.get(architecture)
