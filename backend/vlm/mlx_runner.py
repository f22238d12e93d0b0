"""mlx-vlm vision-language models (Apple Silicon): `mlx_vlm.load` + `stream_generate`.

The folder's transformers processor prepares the inputs, exactly as for the hf runner: its
chat template, then the processor's token ids (image tokens expanded) and pixel values.
`generate` hands those arrays to `mlx_vlm.stream_generate` (mlx-vlm's own input preparation
is skipped: its processors follow transformers' API less closely), whose sampler applies
temperature, top-p/k, min-p and the penalties (a seed seeds MLX's global generator: the
worker runs one request at a time). Written against mlx-vlm 0.7's API.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from backend.vlm.runner import Messages, OnToken, VLMPrompt, transformers_processor
from config import Config
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 4096


class MLXVLMRunner:
    """An mlx-vlm model, with the folder's transformers processor preparing its inputs."""

    def __init__(self, path: str, name: str, config: Config) -> None:
        import mlx_vlm

        self.name = name
        self.hf_processor = transformers_processor(path, config.trust_remote_code)
        self.model, self.processor = mlx_vlm.load(path, trust_remote_code=config.trust_remote_code)
        self.tokenizer = getattr(self.hf_processor, "tokenizer", self.hf_processor)
        model_config = self.model.config
        text_config = getattr(model_config, "text_config", model_config)
        self.max_context_len = int(_get(text_config, "max_position_embeddings")
                                   or DEFAULT_CONTEXT_LEN)
        self.eos_token_ids = frozenset(_ids(_get(model_config, "eos_token_id"))
                                       | _ids(getattr(self.tokenizer, "eos_token_id", None)))

    def check(self, params: SamplingParams) -> None:
        if params.ignore_eos:
            raise InvalidRequestError(
                "ignore_eos is not supported by the mlx vision-language runner", "ignore_eos"
            )

    def prepare(self, messages: Messages, images: list[Image.Image]) -> VLMPrompt:
        """The processor's chat template and inputs (image tokens expanded), as numpy."""
        text = self.hf_processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.hf_processor(text=text, images=images or None, return_tensors="np")
        prompt_ids = [int(t) for t in inputs["input_ids"][0]]
        return VLMPrompt(prompt_ids=prompt_ids, inputs=(text, dict(inputs)))

    def generate(self, prompt: VLMPrompt, params: SamplingParams, on_token: OnToken) -> None:
        import mlx.core as mx
        import mlx_vlm

        if params.seed is not None:
            mx.random.seed(params.seed % 2**32)
        text, inputs = prompt.inputs
        prepared = {"input_ids": mx.array(inputs["input_ids"]),
                    "mask": mx.array(inputs["attention_mask"])}
        if inputs.get("pixel_values") is not None:
            prepared["pixel_values"] = mx.array(inputs["pixel_values"])
        results = mlx_vlm.stream_generate(
            self.model,
            self.processor,
            text,
            **prepared,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else None,
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        try:
            for result in results:
                if result.token is not None and on_token(int(result.token)):
                    break
        finally:
            results.close()


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)
