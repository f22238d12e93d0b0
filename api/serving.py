"""What every generation endpoint shares: the ready engine, limits, defaults, the model check."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from api.errors import APIError
from api.logprobs import TokenTexts
from api.metrics import ServerMetrics
from api.stream import GenerationStream, ParamsFor
from engine.sampling_params import SamplingParams
from multi_device import EnginePool


@dataclass
class ServingContext:
    """The loaded engine plus the server's limits, handed to each endpoint."""

    engine: EnginePool
    metrics: ServerMetrics
    texts: TokenTexts
    timeout_s: float
    max_n: int
    max_prompts: int
    max_in_flight: int
    max_new_tokens_default: int
    kv_capacity: int

    @classmethod
    def build(cls, engine: EnginePool, metrics: ServerMetrics, **limits: Any) -> ServingContext:
        # a request runs on one engine: the smallest engine's KV cache bounds it
        views = engine.snapshot()["engines"]
        capacity = min((int(v["kv_total_slots"]) for v in views if v.get("kv_total_slots")),
                       default=0) or engine.max_context_len
        return cls(engine, metrics, TokenTexts(engine.tokenizer), kv_capacity=capacity, **limits)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output a request may ask for: the model's context, or the
        smallest engine's KV cache when that is smaller."""
        return min(self.engine.max_context_len, self.kv_capacity)

    def check_model(self, name: str | None) -> None:
        """A request naming another model is a 404, as OpenAI answers."""
        if name and name != self.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def params_for(self, sampling: dict[str, Any], max_tokens: int | None) -> ParamsFor:
        """Validate the sampling fields now; the returned function fills in max_new_tokens
        per prompt (the default depends on the prompt's length)."""
        probe = SamplingParams(max_new_tokens=1 if max_tokens is None else max_tokens, **sampling)
        probe.validate(self.max_n)

        def make(prompt_ids: list[int]) -> SamplingParams:
            if max_tokens is not None:
                return probe
            return replace(probe, max_new_tokens=self.default_max_tokens(len(prompt_ids)))

        return make

    def default_max_tokens(self, prompt_len: int) -> int:
        """The context left after the prompt, capped at MAX_NEW_TOKENS_DEFAULT."""
        room = self.max_model_len - prompt_len
        return max(1, min(self.max_new_tokens_default, room))

    def open_stream(self) -> GenerationStream:
        check_in_flight(self.metrics, self.max_in_flight)
        return GenerationStream(self.engine, self.metrics, self.timeout_s, time.monotonic())


def check_in_flight(metrics: ServerMetrics, max_in_flight: int) -> None:
    """A 429 with Retry-After while MAX_INFLIGHT requests (0 = no cap) are open."""
    if max_in_flight and metrics.in_flight >= max_in_flight:
        raise APIError(
            429,
            f"the server is busy ({metrics.in_flight} requests in flight); retry later",
            code="server_busy",
            headers={"Retry-After": "1"},
        )


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"
