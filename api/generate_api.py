"""`POST /generate`: the original NDJSON streaming format, on the engine or on the HF baseline.

Streaming answers one JSON object per line: `{"text_delta": ...}` chunks, then
`{"event": "done", "finish_reason": ..., "usage": {...}}` (or `{"event": "error", "error":
{...}}`). `stream: false` answers `{"text", "finish_reason", "usage"}`. `mode: "hf"` runs the
plain transformers `generate` baseline (`backend.hf.baseline.HFBaseline`), loaded on first use,
where the operator allows it (GENERATE_HF_MODE=1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.errors import APIError
from api.protocol import GenerateRequest, unsupported_fields
from api.serving import ServingContext, check_in_flight
from api.stream import ClientDisconnected, DeltaStream, GenerationResponse, HFStream
from config import Config, resolve_dtype

logger = logging.getLogger(__name__)

NDJSON_MEDIA_TYPE = "application/x-ndjson"

# Sampling fields the HF baseline cannot honour, with their neutral values.
_HF_NEUTRAL: dict[str, Any] = {
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": [],
    "stop_token_ids": [],
}


def ndjson(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"


async def generate(
    body: GenerateRequest, request: Request, ctx: ServingContext, hf: HFMode
) -> Response:
    unsupported_fields(body)
    rid = f"gen-{uuid.uuid4().hex}"
    stream: DeltaStream
    if body.mode == "hf":
        stream = await hf.open(body, ctx, rid)
    else:
        params_for = ctx.params_for(body.sampling_kwargs(), body.max_new_tokens)
        stream = ctx.open_stream()
        await stream.start([body.prompt], params_for, rid, request.is_disconnected)
    if body.stream:
        return GenerationResponse(_ndjson_lines(stream), stream, NDJSON_MEDIA_TYPE)
    try:
        results = await stream.collect(request.is_disconnected)
    except ClientDisconnected:
        return Response(status_code=499)
    result = results[0]
    return JSONResponse(
        {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": stream.usage().model_dump(),
        }
    )


async def _ndjson_lines(stream: DeltaStream) -> AsyncIterator[str]:
    try:
        async for _, delta in stream.deltas():
            if delta.text:
                yield ndjson({"text_delta": delta.text})
            if delta.finished:
                yield ndjson(
                    {
                        "event": "done",
                        "finish_reason": delta.finish_reason,
                        "usage": stream.usage().model_dump(),
                    }
                )
    except APIError as exc:
        yield ndjson({"event": "error", **exc.body()})


class HFMode:
    """`mode: "hf"`: the transformers baseline, built on first use in a worker thread."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._baseline: Any = None
        self._failure: str | None = None
        self._lock = asyncio.Lock()

    async def open(self, body: GenerateRequest, ctx: ServingContext, rid: str) -> HFStream:
        """Check the request as the engine would (sampling, context, the in-flight cap),
        load the baseline on first use, and start its generation."""
        if not self._config.generate_hf_mode:
            raise APIError(400, "mode 'hf' is off on this server (the operator enables it "
                           "with GENERATE_HF_MODE=1)", param="mode", code="mode_unavailable")
        sampling = body.sampling_kwargs()
        for name, neutral in _HF_NEUTRAL.items():
            if sampling.get(name, neutral) != neutral:
                raise APIError(400, f"'{name}' is not supported with mode 'hf'", param=name)
        params_for = ctx.params_for(sampling, body.max_new_tokens)
        prompt_ids = await asyncio.to_thread(ctx.engine.tokenize, body.prompt)
        params = params_for(prompt_ids)
        ctx.engine.check(prompt_ids, params)
        check_in_flight(ctx.metrics, ctx.max_in_flight)
        baseline = await self._load(ctx)
        stream = HFStream(ctx.metrics, ctx.timeout_s, time.monotonic())
        stream.start(baseline, ctx.engine.tokenizer, prompt_ids, params, rid)
        return stream

    async def _load(self, ctx: ServingContext) -> Any:
        async with self._lock:
            if self._baseline is None and self._failure is None:
                try:
                    self._baseline = await asyncio.to_thread(self._build, ctx)
                except Exception as exc:  # an optional mode: report why, keep serving
                    logger.exception("the HF baseline could not be loaded")
                    self._failure = f"{type(exc).__name__}: {exc}"
        if self._baseline is None:
            raise APIError(
                400,
                f"mode 'hf' is unavailable on this server ({self._failure})",
                param="mode",
                code="mode_unavailable",
            )
        return self._baseline

    def _build(self, ctx: ServingContext) -> Any:
        from backend.hf.baseline import HFBaseline

        config = self._config
        device = config.resolved_device()
        return HFBaseline(
            ctx.engine.source,
            dtype=resolve_dtype(config.dtype, device),  # the device's own: no C decoder here
            device=device,
            load_format=config.load_format,
            trust_remote_code=config.trust_remote_code,
            seed=config.seed,
        )
