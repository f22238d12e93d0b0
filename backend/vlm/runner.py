"""The vision-language runner contract and the choice of runner (VLM_BACKEND).

A runner owns one loaded vision-language model and its processor. The service calls
`prepare` on a request's thread (chat template + processor: the prompt's token ids with the
image tokens expanded, and the runner's own inputs) and `generate` on its worker thread,
which reports every sampled token id to `on_token` until that returns True or the model
ends (EOS or `max_new_tokens`). Text, stop strings and finish reasons are the service's.

Messages are in the processor's chat-template format: each message's `content` is a list
of `{"type": "text", "text": ...}` and `{"type": "image"}` parts; `images` holds the
pictures of the image parts in order.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from config import Config, mlx_vlm_available
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OnToken = Callable[[int], bool]
"""Called with each sampled token id; returning True stops the generation."""

Messages = list[dict[str, Any]]


@dataclass
class VLMPrompt:
    """A prepared request: its token ids as the model reads them, and the runner's inputs."""

    prompt_ids: list[int]
    inputs: Any


class VLMRunner(Protocol):
    """One loaded vision-language model."""

    name: str
    tokenizer: Any
    max_context_len: int
    eos_token_ids: frozenset[int]

    def check(self, params: SamplingParams) -> None:
        """Raise InvalidRequestError for sampling parameters this runner cannot honour."""
        ...

    def prepare(self, messages: Messages, images: list[Image.Image]) -> VLMPrompt:
        """Render the chat template and run the processor; thread-safe."""
        ...

    def generate(self, prompt: VLMPrompt, params: SamplingParams, on_token: OnToken) -> None:
        """Generate from `prompt`, reporting each token; runs on the service's worker."""
        ...


def transformers_processor(path: str, trust_remote_code: bool = False) -> Any:
    """The folder's transformers processor, by the class its configs name: importing mlx-vlm
    registers mlx-vlm's own processor classes under AutoProcessor's names."""
    import transformers

    folder = Path(path)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            class_name = json.loads(file.read_text()).get("processor_class")
            if isinstance(class_name, str) and hasattr(transformers, class_name):
                return getattr(transformers, class_name).from_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def resolve_vlm_backend(config: Config) -> str:
    """`auto` → mlx on Apple Silicon when mlx-vlm is installed, else hf."""
    if config.vlm_backend != "auto":
        return config.vlm_backend
    apple_silicon = platform.system() == "Darwin" and platform.machine() == "arm64"
    return "mlx" if apple_silicon and mlx_vlm_available() else "hf"


def load_runner(config: Config) -> VLMRunner:
    """Resolve VLM_MODEL_LOCAL_DIR / VLM_MODEL_NAME and load it with the chosen backend."""
    from backend.loader import resolve_vlm_model

    path, name = resolve_vlm_model(config)
    backend = resolve_vlm_backend(config)
    logger.info("vision-language model %s from %s (%s backend)", name, path, backend)
    if backend == "mlx":
        from backend.vlm.mlx_runner import MLXVLMRunner

        return MLXVLMRunner(path, name, config)
    from backend.vlm.hf_runner import HFVLMRunner

    return HFVLMRunner(path, name, config)
