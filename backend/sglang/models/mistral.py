"""Mistral: Llama's layout without biases.

A sliding window smaller than the context is not applied inside attention; instead the
model's context is capped to the window (`DecoderConfig.max_context_len`), where full and
windowed attention agree.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.sglang.layers import CausalLM, DecoderConfig


class MistralForCausalLM(CausalLM):
    @classmethod
    def decoder_config(cls, hf_config: PretrainedConfig) -> DecoderConfig:
        return DecoderConfig.from_hf(hf_config)
