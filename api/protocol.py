"""Request and response bodies of the HTTP API (pydantic).

Requests validate strictly (no string-to-number coercion) but accept unknown fields, because
the `openai` client merges `extra_body` into the top level: after validation,
`unsupported_fields` rejects every unknown field except the harmless ones in `IGNORED_FIELDS`,
and rejects known OpenAI fields that would change the answer but are not implemented here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling_params import InvalidRequestError

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1

IGNORED_FIELDS = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)

# Known OpenAI fields that are accepted only with a value that does not change the answer.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"),
    "logit_bias": lambda v: v == {},
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "modalities": lambda v: v == ["text"],
    "suffix": lambda v: v == "",
}


class RequestModel(BaseModel):
    """Strict types, unknown fields kept for `unsupported_fields`, and `null` = absent."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class SamplingFields(RequestModel):
    """Sampling fields shared by /generate, chat and completions (None: the default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def sampling_kwargs(self) -> dict[str, Any]:
        """The set fields as SamplingParams keyword arguments."""
        kwargs: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
            )
            if getattr(self, name) is not None
        }
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        kwargs["stop_token_ids"] = list(self.stop_token_ids or [])
        kwargs["ignore_eos"] = self.ignore_eos
        kwargs["skip_special_tokens"] = self.skip_special_tokens
        return kwargs


def unsupported_fields(body: BaseModel) -> None:
    """Raise InvalidRequestError for an unknown field, or a known one we cannot honour."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED_FIELDS:
            continue
        neutral = _NEUTRAL.get(name)
        if neutral is not None:
            if neutral(value):
                continue
            raise InvalidRequestError(f"'{name}' is not supported by this server", name)
        raise InvalidRequestError(f"unknown field '{name}'", name)


class StreamOptions(RequestModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    """stream_options only with stream: true (as OpenAI answers)."""
    if options is not None and not stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true",
                                  "stream_options")


class ImageURL(RequestModel):
    url: str
    detail: str | None = None


class ContentPart(RequestModel):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None

    def required_text(self, field: str) -> str:
        """A text part's text; a 400 naming `<field>.text` when the part has none."""
        if self.text is None:
            raise InvalidRequestError(f"{field}.text is required", f"{field}.text")
        return self.text


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def output_limit(self) -> int | None:
        """max_completion_tokens, else max_tokens (None: the server's default); a value
        below 1 is refused naming the field the client sent."""
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None:
                if value < 1:
                    raise InvalidRequestError(f"{name} must be at least 1", name)
                return int(value)
        return None


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool = False


class GenerateRequest(SamplingFields):
    prompt: str
    max_new_tokens: int | None = None
    stream: bool = True
    mode: Literal["sglang", "hf"] = "sglang"


# ------------------------------------------------------------------ responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # Set when ADAPTIVE_MAX_NEW_TOKENS lowered max_tokens to this under load.
    adjusted_max_tokens: int | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (streaming) one chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "minisgl"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
