"""Llama (2, 3.x; also SmolLM): optional attention and MLP biases from the config."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.sglang.layers import CausalLM, DecoderConfig


class LlamaForCausalLM(CausalLM):
    @classmethod
    def decoder_config(cls, hf_config: PretrainedConfig) -> DecoderConfig:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderConfig.from_hf(
            hf_config,
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )
