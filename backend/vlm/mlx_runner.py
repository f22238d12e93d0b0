"""mlx-vlm vision-language models (Apple Silicon): `mlx_vlm.load` + `stream_generate`.

The prompt is the processor's chat template (as with the hf runner); `prepare` runs
`mlx_vlm.prepare_inputs` once to count the prompt's tokens with the image tokens expanded,
and `generate` hands the same prompt and images to `mlx_vlm.stream_generate`, whose own
sampler applies temperature, top-p/k, min-p and the penalties (a seed seeds MLX's global
generator: the worker runs one request at a time). Written against mlx-vlm 0.7's API.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from backend.vlm.runner import Messages, OnToken, VLMPrompt
from config import Config
from engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 4096


class MLXVLMRunner:
    """An mlx-vlm model and its processor."""

    def __init__(self, path: str, name: str, config: Config) -> None:
        import mlx_vlm

        self.name = name
        self.model, self.processor = mlx_vlm.load(path, trust_remote_code=config.trust_remote_code)
        if not getattr(self.processor, "chat_template", None):
            # mlx-vlm's own processor classes do not read the folder's template file
            self.processor.chat_template = folder_chat_template(path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
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
        import mlx_vlm

        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = mlx_vlm.prepare_inputs(
            self.processor,
            images=images or None,
            prompts=text,
            image_token_index=_get(self.model.config, "image_token_index"),
        )
        prompt_ids = [int(t) for t in inputs["input_ids"].tolist()[0]]
        return VLMPrompt(prompt_ids=prompt_ids, inputs=(text, images))

    def generate(self, prompt: VLMPrompt, params: SamplingParams, on_token: OnToken) -> None:
        import mlx.core as mx
        import mlx_vlm

        if params.seed is not None:
            mx.random.seed(params.seed % 2**32)
        text, images = prompt.inputs
        results = mlx_vlm.stream_generate(
            self.model,
            self.processor,
            text,
            image=images or None,
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


def folder_chat_template(path: str) -> str | None:
    """The chat template a model folder ships (chat_template.jinja, or chat_template.json)."""
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)
