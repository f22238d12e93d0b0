"""`/v1/chat/completions` and `/v1/completions`: OpenAI bodies in, OpenAI bodies or SSE out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from api.errors import APIError
from api.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ContentPart,
    check_stream_options,
    unsupported_fields,
)
from api.serving import SSE_DONE, SSE_MEDIA_TYPE, ServingContext, sse
from api.stream import ClientDisconnected, DeltaStream, GenerationResponse, GenerationStream
from engine.engine import Prompt
from engine.sampling_params import MAX_TOP_LOGPROBS, InvalidRequestError

IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
AUDIO_PARTS = frozenset({"input_audio", "audio"})


# ------------------------------------------------------------------ chat
async def chat_completions(
    body: ChatCompletionRequest, request: Request, ctx: ServingContext
) -> Response:
    unsupported_fields(body)
    check_stream_options(body.stream, body.stream_options)
    ctx.check_model(body.model)
    messages = chat_messages(body.messages)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs: true", "top_logprobs")
    max_tokens = body.output_limit()
    sampling = body.sampling_kwargs() | {
        "n": body.n,
        "logprobs": body.logprobs,
        "top_logprobs": body.top_logprobs or 0,
    }
    params_for = ctx.params_for(sampling, max_tokens)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    stream = ctx.open_stream()
    try:
        await stream.start([messages], params_for, rid, request.is_disconnected)
    except InvalidRequestError as exc:  # name the field the client sent
        if exc.param == "max_tokens" and body.max_completion_tokens is not None:
            exc.param = "max_completion_tokens"
        raise
    texts = ctx.texts if body.logprobs else None
    return await chat_answer(body, request, stream, rid, ctx.model_name, texts)


async def chat_answer(
    body: ChatCompletionRequest,
    request: Request,
    stream: DeltaStream,
    rid: str,
    model_name: str,
    texts: TokenTexts | None,
) -> Response:
    """The started `stream` as a chat completion: SSE chunks or one JSON body. `texts` is
    needed only when the request asked for logprobs."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(stream, model_name, texts, rid, body.n, include_usage)
        return GenerationResponse(chunks, stream, SSE_MEDIA_TYPE)
    try:
        results = await stream.collect(request.is_disconnected)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = [
        ChatChoice(
            index=r.index,
            message=AssistantMessage(content=r.text),
            logprobs=chat_logprobs(r.logprobs, texts) if texts is not None else None,
            finish_reason=r.finish_reason,
        )
        for r in results
    ]
    answer = ChatCompletionResponse(id=rid, model=model_name, choices=choices,
                                    usage=stream.usage())
    return Response(answer.model_dump_json(), media_type="application/json")


ContentConverter = Callable[[str | list[ContentPart] | None, str], Any]


def chat_messages(
    messages: list[ChatMessage], content: ContentConverter | None = None
) -> list[dict[str, Any]]:
    """The request's messages as the chat template expects them; `content(content, where)`
    converts each message's content (default: text only, parts joined by newlines)."""
    convert = content or _message_text
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    converted = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        for name, value in (message.model_extra or {}).items():
            if value not in (None, [], ""):
                raise InvalidRequestError(f"{where}.{name} is not supported", f"{where}.{name}")
        if message.role == "tool":
            raise InvalidRequestError("tool messages are not supported", f"{where}.role")
        if message.content is None and message.role != "assistant":
            raise InvalidRequestError(f"{where}.content is required", f"{where}.content")
        if isinstance(message.content, list) and not message.content:
            raise InvalidRequestError(f"{where}.content must not be an empty array",
                                      f"{where}.content")
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": convert(message.content, f"{where}.content"),
        }
        if message.name:
            entry["name"] = message.name
        converted.append(entry)
    return converted


def _message_text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.type in IMAGE_PARTS:
            raise InvalidRequestError("image inputs are not supported by this model", where)
        if part.type in AUDIO_PARTS:
            raise InvalidRequestError("audio inputs are not supported by this model", where)
        if part.type != "text":
            raise InvalidRequestError(
                f"content parts of type '{part.type}' are not supported", where
            )
        texts.append(part.required_text(f"{where}[{number}]"))
    return "\n".join(texts)


async def _chat_chunks(
    stream: DeltaStream,
    model_name: str,
    texts: TokenTexts | None,
    rid: str,
    n: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Any = None) -> str:
        body = ChatCompletionChunk(
            id=rid, created=created, model=model_name, choices=choices, usage=usage
        )
        return sse(body)

    try:
        for index in range(n):
            yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
        async for index, delta in stream.deltas():
            logprobs = None
            if texts is not None and delta.logprobs:
                logprobs = chat_logprobs(delta.logprobs, texts)
            if not (delta.text or delta.finished or logprobs):
                continue
            choice = ChatChunkChoice(
                index=index,
                delta={"content": delta.text} if delta.text else {},
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
            )
            yield chunk([choice])
        if include_usage:
            yield chunk([], usage=stream.usage())
    except APIError as exc:
        yield sse(exc.body())
    yield SSE_DONE


# ----------------------------------------------------------- completions
async def completions(body: CompletionRequest, request: Request, ctx: ServingContext) -> Response:
    unsupported_fields(body)
    check_stream_options(body.stream, body.stream_options)
    ctx.check_model(body.model)
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of other than n is not supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported", "echo")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    prompts = completion_prompts(body.prompt)
    if len(prompts) > ctx.max_prompts:
        raise InvalidRequestError(
            f"at most {ctx.max_prompts} prompts per request, got {len(prompts)}", "prompt")
    sampling = body.sampling_kwargs() | {
        "n": body.n,
        "logprobs": body.logprobs is not None,
        "top_logprobs": body.logprobs or 0,
    }
    params_for = ctx.params_for(sampling, body.max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    stream = ctx.open_stream()
    await stream.start(prompts, params_for, rid, request.is_disconnected)
    echoes = [_echo_text(ctx, p) for p in prompts] if body.echo else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _completion_chunks(stream, ctx, rid, body, echoes, include_usage)
        return GenerationResponse(chunks, stream, SSE_MEDIA_TYPE)
    try:
        results = await stream.collect(request.is_disconnected)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for r in results:
        prefix = echoes[r.index // body.n] if echoes else ""
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(r.logprobs, ctx.texts, len(prefix))
        choices.append(
            CompletionChoice(
                index=r.index,
                text=prefix + r.text,
                logprobs=logprobs,
                finish_reason=r.finish_reason,
            )
        )
    answer = CompletionResponse(id=rid, model=ctx.model_name, choices=choices, usage=stream.usage())
    return Response(answer.model_dump_json(), media_type="application/json")


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """One engine prompt per entry: text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt if isinstance(p, int)]]
    prompts: list[Prompt] = []
    for entry in prompt:
        if isinstance(entry, list) and not entry:
            raise InvalidRequestError("prompt token lists must not be empty", "prompt")
        if isinstance(entry, str):
            prompts.append(entry)
        elif isinstance(entry, list):
            prompts.append([int(t) for t in entry])
    return prompts


def _echo_text(ctx: ServingContext, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    token_ids = [t for t in prompt if isinstance(t, int)]
    return str(ctx.engine.tokenizer.decode(token_ids, skip_special_tokens=False))


async def _completion_chunks(
    stream: GenerationStream,
    ctx: ServingContext,
    rid: str,
    body: CompletionRequest,
    echoes: list[str] | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())
    offsets: dict[int, int] = {}

    def chunk(choices: list[CompletionChoice], usage: Any = None) -> str:
        return sse(
            CompletionResponse(
                id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage
            )
        )

    try:
        async for index, delta in stream.deltas():
            text = delta.text
            if index not in offsets:
                text = (echoes[index // body.n] if echoes else "") + text
                offsets[index] = len(text) - len(delta.text)
            logprobs = None
            if body.logprobs is not None and delta.logprobs:
                logprobs = completion_logprobs(delta.logprobs, ctx.texts, offsets[index])
                offsets[index] = logprobs_end(logprobs, offsets[index])
            if not (text or delta.finished or logprobs):
                continue
            yield chunk(
                [
                    CompletionChoice(
                        index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                ]
            )
        if include_usage:
            yield chunk([], usage=stream.usage())
    except APIError as exc:
        yield sse(exc.body())
    yield SSE_DONE


def logprobs_end(logprobs: Any, start: int) -> int:
    """The text offset just past the last token of a completions logprobs block."""
    if not logprobs.tokens:
        return start
    return int(logprobs.text_offset[-1]) + len(logprobs.tokens[-1])
