"""`POST /generate`: the original NDJSON streaming format, on the engine or on the HF baseline.

Streaming answers one JSON object per line: `{"text_delta": ...}` chunks, then
`{"event": "done", "finish_reason": ..., "usage": {...}}` (or `{"event": "error", "error":
{...}}`). `stream: false` answers `{"text", "finish_reason", "usage"}`. `mode: "hf"` runs the
plain transformers `generate` baseline (`backend.hf.baseline.HFBaseline`), loaded on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.errors import APIError
from api.protocol import GenerateRequest, UsageInfo, unsupported_fields
from api.serving import ServingContext
from api.stream import NO_BUFFERING, ClientDisconnected, GenerationResponse, GenerationStream
from config import Config
from engine.sampling_params import SamplingParams

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
    if body.mode == "hf":
        return await hf.generate(body, ctx)
    params_for = ctx.params_for(body.sampling_kwargs(), body.max_new_tokens)
    stream = ctx.open_stream()
    await stream.start([body.prompt], params_for, f"gen-{uuid.uuid4().hex}")
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


async def _ndjson_lines(stream: GenerationStream) -> AsyncIterator[str]:
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

    async def generate(self, body: GenerateRequest, ctx: ServingContext) -> Response:
        sampling = body.sampling_kwargs()
        for name, neutral in _HF_NEUTRAL.items():
            if sampling.get(name, neutral) != neutral:
                raise APIError(400, f"'{name}' is not supported with mode 'hf'", param=name)
        params = ctx.params_for(sampling, body.max_new_tokens)
        prompt_ids = await asyncio.to_thread(ctx.engine.tokenize, body.prompt)
        sp = params(prompt_ids)
        baseline = await self._load(ctx)
        pieces = _hf_text(baseline, prompt_ids, sp)
        if body.stream:
            return StreamingResponse(
                self._ndjson_lines(pieces, ctx, prompt_ids, sp),
                media_type=NDJSON_MEDIA_TYPE,
                headers=NO_BUFFERING,
            )
        try:
            text = await asyncio.wait_for(_join(pieces), ctx.timeout_s or None)
        except asyncio.TimeoutError:
            raise APIError(
                504, "the request ran past the server's time limit", code="request_timeout"
            ) from None
        reason, usage = await asyncio.to_thread(_hf_usage, ctx, prompt_ids, text, sp)
        return JSONResponse({"text": text, "finish_reason": reason, "usage": usage.model_dump()})

    async def _ndjson_lines(
        self,
        pieces: AsyncIterator[str],
        ctx: ServingContext,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> AsyncIterator[str]:
        text = ""
        try:
            async for piece in pieces:
                text += piece
                if piece:
                    yield ndjson({"text_delta": piece})
        except APIError as exc:
            yield ndjson({"event": "error", **exc.body()})
            return
        reason, usage = await asyncio.to_thread(_hf_usage, ctx, prompt_ids, text, params)
        yield ndjson({"event": "done", "finish_reason": reason, "usage": usage.model_dump()})

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
        return HFBaseline(
            ctx.engine.source,
            dtype=config.resolved_dtype(),
            device=config.resolved_device(),
            load_format=config.load_format,
            trust_remote_code=config.trust_remote_code,
            seed=config.seed,
        )


def _hf_usage(
    ctx: ServingContext, prompt_ids: list[int], text: str, params: SamplingParams
) -> tuple[str, UsageInfo]:
    """Usage of a baseline answer; its token count is the text re-tokenized."""
    completion = len(ctx.engine.tokenizer.encode(text, add_special_tokens=False))
    reason = "length" if completion >= params.max_new_tokens else "stop"
    return reason, UsageInfo.of(len(prompt_ids), completion, 0)


async def _join(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


async def _hf_text(
    baseline: Any, prompt_ids: list[int], params: SamplingParams
) -> AsyncIterator[str]:
    """The baseline's blocking text stream, pumped by a thread; stops when the consumer goes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def put(item: str | BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        pieces: Iterator[str] = baseline.stream(
            prompt_ids,
            params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
        )
        try:
            for piece in pieces:
                if stop.is_set():
                    break
                put(piece)
        except Exception as exc:
            put(exc)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
            put(None)

    threading.Thread(target=pump, name="hf-baseline-pump", daemon=True).start()
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise APIError(500, f"the HF baseline failed: {item}", type="server_error")
            yield item
    finally:
        stop.set()
