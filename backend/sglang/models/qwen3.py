"""Qwen3 (dense): per-head RMSNorm on q and k before rope; head_dim set by the config."""

from __future__ import annotations

from transformers import PretrainedConfig

from backend.sglang.layers import CausalLM, DecoderConfig


class Qwen3ForCausalLM(CausalLM):
    @classmethod
    def decoder_config(cls, hf_config: PretrainedConfig) -> DecoderConfig:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderConfig.from_hf(
            hf_config, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True
        )
