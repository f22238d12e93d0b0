"""The plain transformers baseline: `model.generate`, one request at a time or one padded batch.

This is what benchmarks compare the engine against and what `mode: "hf"` serves. It owns
its own copy of the model (sdpa attention, HF's own KV cache); nothing here touches the
paged pool or the scheduler.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Generator
from typing import Any

import torch

from backend.loader import ModelSource, eos_token_ids, load_tokenizer
from engine.sampling_params import GREEDY_BELOW

logger = logging.getLogger(__name__)


# the logit filters a checkpoint's generation_config.json may switch on, at their neutral
# values (`clear_logit_filters`)
NEUTRAL_GENERATION: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": None,
    "min_length": 0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "length_penalty": 1.0,
    "renormalize_logits": False,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "top_h": None,
    "stop_strings": None,
}


def clear_logit_filters(model: Any) -> None:
    """Set the model's own generation config's logit filters neutral. transformers fills
    every field a call's GenerationConfig leaves None from it, so the penalties, n-gram bans
    and suppressed tokens a checkpoint ships would change greedy (its special tokens, cache
    settings and the rest stay)."""
    own = getattr(model, "generation_config", None)
    if own is None:
        return
    for name, value in NEUTRAL_GENERATION.items():
        if hasattr(own, name):
            setattr(own, name, value)


class _Cancelled:
    """A generate stopping criterion that fires once the consumer has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class HFBaseline:
    """`model.generate` behind a streaming and a batch interface."""

    def __init__(
        self,
        source: ModelSource,
        *,
        dtype: torch.dtype,
        device: torch.device,
        load_format: str = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.source = source
        self.device = torch.device(device)
        self._trust_remote_code = trust_remote_code
        if load_format == "dummy":
            torch.manual_seed(seed)
            with self.device:
                self.model = AutoModelForCausalLM.from_config(
                    copy.deepcopy(source.hf_config),
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, trust_remote_code=trust_remote_code
            )
        self.model.to(self.device).eval().requires_grad_(False)
        clear_logit_filters(self.model)
        self.eos_token_ids = list(eos_token_ids(source))
        self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (generate_batch never needs it)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, self._trust_remote_code)
        return self._tokenizer

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> Generator[str, None, None]:
        """Text deltas of one generation; requests run one at a time, as plain HF does.

        Closing the iterator early stops the generation at its next step.
        """
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = _Cancelled()
        kwargs = self._generate_kwargs(max_new_tokens, temperature, top_p, top_k, ignore_eos)
        kwargs.update(
            input_ids=torch.tensor([prompt_ids], device=self.device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64, device=self.device),
            streamer=streamer,
            stopping_criteria=[cancelled],
        )
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if seed is not None:
                        torch.manual_seed(seed)
                    self.model.generate(**kwargs)
            except BaseException as exc:
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="hf-baseline-generate", daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            cancelled.event.set()
        thread.join()
        if failure:
            raise failure[0]

    @torch.inference_mode()
    def generate_batch(
        self, list_of_prompt_ids: list[list[int]], max_new_tokens: int, ignore_eos: bool = True
    ) -> list[list[int]]:
        """Greedy new tokens of every prompt, generated as one left-padded batch."""
        width = max(len(p) for p in list_of_prompt_ids)
        input_ids = torch.full((len(list_of_prompt_ids), width), self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(list_of_prompt_ids):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        kwargs = self._generate_kwargs(max_new_tokens, 0.0, 1.0, 0, ignore_eos)
        with self._lock:
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                **kwargs,
            )
        rows = output[:, width:].tolist()
        return rows if ignore_eos else [self._trim(row) for row in rows]

    def _trim(self, tokens: list[int]) -> list[int]:
        """A finished row ends at its first EOS (inclusive); HF pads the rest."""
        for index, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return tokens[: index + 1]
        return tokens

    def _generate_kwargs(
        self, max_new_tokens: int, temperature: float, top_p: float, top_k: int, ignore_eos: bool
    ) -> dict[str, Any]:
        """GenerationConfig fields left None are filled from the model's own generation
        config: "no EOS" is an empty list, not None (the model's own logit filters were set
        neutral at load, `clear_logit_filters`)."""
        from transformers import GenerationConfig

        sampling = temperature >= GREEDY_BELOW
        generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=(top_k if top_k > 0 else 0) if sampling else None,  # 0: no top-k (None: 50)
            eos_token_id=[] if ignore_eos else self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        return {"generation_config": generation}
