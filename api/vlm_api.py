"""`/v1/chat/completions` with image parts: the vision-language model beside the LLM.

Routing (`chat_target`): a request whose `model` is the VLM's name goes to the VLM (with or
without images); a request with image parts and no `model` goes to the VLM as well; image
parts sent to the LLM's name, or to a server with no VLM, are a 400. Everything else is the
LLM's, unchanged. Image parts are OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`
(a `data:` URL, an http(s) URL, or with ALLOW_FILE_IMAGE_URL a file); each is fetched and
decoded under the server's `ImagePolicy` (backend/vlm/images.py) and every refusal is a
400 naming the part. The answer streams through the same chunk and body code as the LLM's.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response
from PIL import Image

from api.errors import APIError
from api.metrics import ServerMetrics
from api.openai_api import chat_answer, chat_messages
from api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    check_stream_options,
    unsupported_fields,
)
from api.serving import check_in_flight
from api.stream import ClientDisconnected, VLMStream
from backend.vlm.images import ImageInputError, ImagePolicy, load_image
from backend.vlm.service import VLMService
from engine.sampling_params import InvalidRequestError, SamplingParams

ChatTarget = Literal["llm", "vlm"]


@dataclass
class VLMServing:
    """The loaded vision-language service plus the server's limits for it."""

    service: VLMService
    metrics: ServerMetrics
    policy: ImagePolicy
    timeout_s: float
    max_images: int
    max_in_flight: int

    @property
    def model_name(self) -> str:
        return self.service.name

    def open_stream(self) -> VLMStream:
        check_in_flight(self.metrics, self.max_in_flight)
        return VLMStream(self.service, self.metrics, self.timeout_s, time.monotonic())


def first_image_content(messages: list[ChatMessage]) -> str | None:
    """The content field of the first message with an image part (`messages[i].content`)."""
    for number, message in enumerate(messages):
        content = message.content
        if isinstance(content, list) and any(p.type == "image_url" for p in content):
            return f"messages[{number}].content"
    return None


def chat_target(
    model: str | None,
    image_field: str | None,
    llm_name: str | None,
    vlm_name: str | None,
    vlm_configured: bool,
) -> ChatTarget:
    """Which model serves a chat request (see the module docstring); raises the 400/404s.
    `image_field` names the first content with an image part (None: no images);
    `vlm_name` is None while the VLM is not loaded."""
    if vlm_name is not None and model == vlm_name:
        return "vlm"
    if image_field is None:
        return "llm"
    if not vlm_configured:
        raise APIError(
            400,
            "image inputs need a vision-language model and this server serves none "
            "(the operator sets VLM_MODEL_NAME to serve one)",
            param=image_field,
        )
    if model and model == llm_name:  # (also while the VLM loads or after it failed)
        target = f"'{vlm_name}'" if vlm_name else "the vision-language model"
        raise APIError(400, f"the model '{model}' does not take image inputs; send them to "
                       f"{target}", param="model")
    if not model or vlm_name is None:
        return "vlm"
    raise APIError(
        404,
        f"the model '{model}' does not exist; this server serves '{llm_name}' and, for image "
        f"inputs, '{vlm_name}'",
        param="model",
        code="model_not_found",
    )


async def chat_completions(
    body: ChatCompletionRequest, request: Request, vlm: VLMServing
) -> Response:
    unsupported_fields(body)
    check_stream_options(body.stream, body.stream_options)
    _check_supported(body)
    urls: list[tuple[str, str]] = []
    messages = chat_messages(body.messages, lambda content, where: _parts(content, where, urls))
    if len(urls) > vlm.max_images:
        raise InvalidRequestError(
            f"at most {vlm.max_images} images per request, got {len(urls)}", "messages")
    max_tokens = body.output_limit()
    probe_max = 1 if max_tokens is None else max_tokens  # the default is fitted later
    params = SamplingParams(max_new_tokens=probe_max, **body.sampling_kwargs())
    params.validate(max_n=1)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    # the in-flight cap and the time limit hold from here: image downloads count too
    stream = vlm.open_stream()
    try:
        images = [await stream.before_start(_load(url, where, vlm.policy),
                                            request.is_disconnected) for url, where in urls]
        prompt, params = await asyncio.to_thread(
            vlm.service.prepare, messages, images, params, max_tokens)
        stream.start(prompt, params, rid)
    except ClientDisconnected:
        return Response(status_code=499)
    except BaseException:
        stream.close()
        raise
    return await chat_answer(body, request, stream, rid, vlm.model_name, texts=None)


def _check_supported(body: ChatCompletionRequest) -> None:
    if body.n != 1:
        raise InvalidRequestError("the vision-language model serves n = 1 only", "n")
    if body.logprobs or body.top_logprobs:
        raise InvalidRequestError(
            "logprobs are not supported by the vision-language model", "logprobs")


def _parts(
    content: str | list[ContentPart] | None, where: str, urls: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """A message's content as chat-template parts; image URLs are collected into `urls`
    with the field they came from."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        field = f"{where}[{number}]"
        if part.type == "text":
            parts.append({"type": "text", "text": part.required_text(field)})
        elif part.type == "image_url":
            urls.append((_image_url(part, field), f"{field}.image_url"))
            parts.append({"type": "image"})
        else:
            raise InvalidRequestError(
                f"content parts of type '{part.type}' are not supported (use 'text' or "
                "'image_url')", field)
    return parts


def _image_url(part: ContentPart, field: str) -> str:
    image_url = part.image_url
    if image_url is None:
        raise InvalidRequestError(f"{field}.image_url is required", f"{field}.image_url")
    return image_url if isinstance(image_url, str) else image_url.url


async def _load(url: str, where: str, policy: ImagePolicy) -> Image.Image:
    try:
        return await load_image(url, policy)
    except ImageInputError as exc:
        raise APIError(400, f"{where}: {exc}", param=where, code="invalid_image") from None
