"""Any transformers vision-language model: AutoModelForImageTextToText + AutoProcessor.

The prompt is the processor's chat template rendered over the request's messages, then the
processor turns text and images into the model's inputs. Generation is `model.generate`
with the engine's own `Sampler` deciding every token (through a logits processor that
leaves only the chosen token), so the VLM honours the same sampling parameters as the LLM
(temperature, top-p/k, min-p, penalties, per-request seeds) and a stopping criterion
reports each token to the service and stops when it says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from backend.hf.baseline import clear_logit_filters
from backend.loader import ModelSource, eos_token_ids
from backend.vlm.runner import Messages, OnToken, VLMPrompt, transformers_processor
from config import Config, resolve_device
from engine.sampler import RequestHistory, Sampler
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CONTEXT_LEN = 4096


def vlm_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA, float16 on MPS, float32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)


class _EngineSampling:
    """A generate logits processor: the engine's sampler picks the token, every other
    logit becomes -inf (so generate's own choice is that token)."""

    def __init__(self, sampler: Sampler, params: SamplingParams, history: RequestHistory):
        self.sampler = sampler
        self.params = params
        self.history = history

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.sampler.sample(scores.float(), [self.params], [self.history]).token_ids[0]
        self.history.append(token)
        only = torch.full_like(scores, float("-inf"))
        only[0, token] = 0.0
        return only


class _ReportTokens:
    """A generate stopping criterion: hands each new token to `on_token`, stops when it
    returns True."""

    def __init__(self, on_token: OnToken) -> None:
        self.on_token = on_token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        stop = self.on_token(int(input_ids[0, -1]))
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class HFVLMRunner:
    """A transformers image-text-to-text model and its processor on one device."""

    def __init__(self, path: str, name: str, config: Config) -> None:
        from transformers import AutoModelForImageTextToText

        self.name = name
        self.device = resolve_device(config.vlm_device)
        self.dtype = vlm_dtype(config.vlm_dtype, self.device)
        remote = config.trust_remote_code
        self.processor = transformers_processor(path, remote)
        model: Any = AutoModelForImageTextToText.from_pretrained(
            path, dtype=self.dtype, trust_remote_code=remote
        )
        self.model = model.to(self.device).eval()
        clear_logit_filters(self.model)  # the engine's sampler decides, over raw logits
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        text_config = self.model.config.get_text_config()
        self.max_context_len = int(
            getattr(text_config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_LEN
        )
        source = ModelSource(path=path, hf_config=self.model.config, name=name)
        self.eos_token_ids = frozenset(eos_token_ids(source, self.tokenizer))
        self.pad_token_id = min(self.eos_token_ids, default=0)
        vocab_size = int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer))
        self.sampler = Sampler(vocab_size, self.device, seed=config.seed)

    def check(self, params: SamplingParams) -> None:
        """Every SamplingParams field is honoured."""

    def prepare(self, messages: Messages, images: list[Image.Image]) -> VLMPrompt:
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        return VLMPrompt(prompt_ids=inputs["input_ids"][0].tolist(), inputs=inputs)

    @torch.inference_mode()
    def generate(self, prompt: VLMPrompt, params: SamplingParams, on_token: OnToken) -> None:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        inputs = {key: value.to(self.device) for key, value in prompt.inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        history = RequestHistory(prompt.prompt_ids, params.seed, self.device)
        generation = GenerationConfig(  # every logit filter neutral: the sampler decides
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=[] if params.ignore_eos else sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )
        self.model.generate(
            **inputs,
            generation_config=generation,
            logits_processor=LogitsProcessorList([_EngineSampling(self.sampler, params, history)]),
            stopping_criteria=StoppingCriteriaList([_ReportTokens(on_token)]),
        )
