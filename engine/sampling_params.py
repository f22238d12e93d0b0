"""Per-request sampling parameters, validated once when the request is made."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_K = 2**31 - 1  # top_k past the vocabulary keeps every token
GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it would overflow)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # 1 = off; <1 favours repeats


class InvalidRequestError(ValueError):
    """A request that cannot be served as given; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request.

    temperature 0 (or below GREEDY_BELOW) means greedy. top_k <= 0 and top_p == 1 and
    min_p == 0 disable those filters. Penalties of 1.0 (repetition) and 0.0 (presence,
    frequency) are neutral.
    `seed` makes the request's samples depend only on the seed and its own logits.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    skip_special_tokens: bool = True

    def validate(self, max_n: int = 16) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if self.max_new_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be in [0, 2]", "temperature")
        if self.top_k > MAX_TOP_K:
            raise InvalidRequestError(f"top_k must be at most {MAX_TOP_K}", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be in [0, 1]", "min_p")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(  # a vanishing one would scale logits to infinity
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                f"{MAX_REPETITION_PENALTY:g}]", "repetition_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError("presence_penalty must be in [-2, 2]", "presence_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError("frequency_penalty must be in [-2, 2]", "frequency_penalty")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs"
            )
        if not 1 <= self.n <= max_n:
            raise InvalidRequestError(f"n must be in [1, {max_n}]", "n")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids",
                                      "stop_token_ids")
        if any(token < 0 for token in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must not be negative", "stop_token_ids")

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """`stop_token_ids` for a lookup per sampled token."""
        return frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
