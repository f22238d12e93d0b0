"""Our SamplingParams as mlx-lm samplers and logits processors; what mlx-lm cannot honour is
rejected before the request is queued.

mlx-lm samples from log-probabilities: top-p, min-p and top-k filter them, then a token is
drawn from softmax(logprobs / temperature); temperature 0 is argmax. The repetition penalty
covers the prompt and the output (as the native engine's does). mlx-lm's presence and
frequency penalties count the prompt too, unlike OpenAI's, so they are refused. A request
with a `seed` draws from its own PRNG key, so its tokens depend only on the seed and its
logits, also inside a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from engine.request import TokenLogprob
from engine.sampling_params import InvalidRequestError, SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


def check_supported(params: SamplingParams) -> None:
    """Raise InvalidRequestError for a parameter the MLX backend does not implement."""
    for name, neutral in UNSUPPORTED.items():
        if getattr(params, name) != neutral:
            raise InvalidRequestError(
                f"{name} is not supported by the MLX backend (BACKEND_IMPL=mlx); "
                f"leave it at {neutral:g}",
                name,
            )


def sampler_for(params: SamplingParams, vocab_size: int) -> Sampler:
    """The sampler of one request: greedy, shared by every request with the same filters
    (so a batch of them samples in one call), or its own when it has a seed."""
    if params.greedy:
        return greedy_sampler
    top_k = params.top_k if 0 < params.top_k < vocab_size else 0
    top_p = params.top_p if params.top_p < 1.0 else 0.0
    if params.seed is None:
        return _shared_sampler(params.temperature, top_p, params.min_p, top_k)
    return SeededSampler(params.temperature, top_p, params.min_p, top_k, params.seed)


@lru_cache(maxsize=64)
def _shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int) -> Sampler:
    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


class SeededSampler:
    """mlx-lm's filters, then a draw with this request's own PRNG key."""

    def __init__(self, temperature: float, top_p: float, min_p: float, top_k: int,
                 seed: int) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.min_p = min_p
        self.top_k = top_k
        self._key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> mx.array:
        if 0.0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        self._key, draw = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw)


def processors_for(params: SamplingParams, context_len: int) -> list[LogitsProcessor]:
    """The request's logits processors (the repetition penalty over its whole context)."""
    if params.repetition_penalty == 1.0:
        return []
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty, repetition_context_size=context_len
    )


def token_logprob(logprobs: mx.array, token: int, top: int) -> TokenLogprob:
    """The sampled token's log-probability and the `top` most likely alternatives."""
    pairs: list[tuple[int, float]] = []
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        top_ids: list[int] = ids.tolist()  # type: ignore[assignment]
        top_values: list[float] = logprobs[ids].tolist()  # type: ignore[assignment]
        pairs = sorted(zip(top_ids, top_values), key=lambda p: -p[1])
    value: float = logprobs[token].item()  # type: ignore[assignment]
    return TokenLogprob(token, value, pairs)
