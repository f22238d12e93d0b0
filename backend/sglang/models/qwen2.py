"""Qwen2 / Qwen2.5: biases on q/k/v only."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.sglang.layers import CausalLM, DecoderConfig


class Qwen2ForCausalLM(CausalLM):
    @classmethod
    def decoder_config(cls, hf_config: PretrainedConfig) -> DecoderConfig:
        return DecoderConfig.from_hf(hf_config, qkv_bias=True)
