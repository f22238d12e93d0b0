"""POST /v1/images/generations: OpenAI's images API over the diffusion service.

Fields: `prompt`, `n`, `size` ("WxH", or "auto") or `aspect` (a preset), `response_format`
(only `b64_json`: the server keeps no files to link to), `model` (a configured image model),
`output_format` (png), `background` (auto / opaque), and the extensions `seed`, `steps`,
`guidance_scale`, `negative_prompt`. The job runs on the diffusion worker; this coroutine
only awaits its future, so LLM streams keep flowing, and cancels the job when its client
leaves or REQUEST_TIMEOUT_S passes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from api.errors import APIError
from api.stream import DeadlinePassed, wait_polling
from backend.diffusion.images import (
    ImageRequest,
    ImageRequestError,
    parse_size,
    png_bytes,
    validate,
)
from backend.diffusion.service import DiffusionBusy, DiffusionJob, DiffusionService

IsDisconnected = Callable[[], Awaitable[bool]]


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: StrictInt | None = None  # null: 1 (OpenAI's fields are nullable)
    size: str | None = None
    aspect: str | None = None
    response_format: str | None = None  # null: b64_json
    quality: str | None = None  # accepted for OpenAI compatibility, ignored
    style: str | None = None
    user: str | None = None
    moderation: str | None = None
    output_format: str | None = None  # png only
    output_compression: StrictInt | None = None  # (for jpeg/webp; png has none)
    background: str | None = None  # auto / opaque
    seed: int | None = Field(default=None)
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None


async def run_job(submit: Callable[[], DiffusionJob], what: str,
                  is_disconnected: IsDisconnected, timeout_s: float) -> Any:
    """Queue a diffusion job and await it off the event loop: a full queue is a 429 with
    Retry-After, a failed job a 500. A client that leaves (499) or a job past `timeout_s`
    (504; 0 = no limit) cancels it: dropped if it waits, stopped between steps if it runs."""
    try:
        job = submit()
    except DiffusionBusy as exc:
        raise APIError(429, str(exc), code="server_busy", headers={"Retry-After": "5"}) from None
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    result = asyncio.wrap_future(job.future)
    # a job cancelled while it runs still ends (JobCancelled) after its awaiter has gone
    result.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await wait_polling(result, deadline, is_disconnected)
    except DeadlinePassed:
        job.cancel()
        raise APIError(504, f"the {what} job ran past the server's time limit and was "
                       "cancelled", code="request_timeout") from None
    except BaseException:
        job.cancel()
        raise
    try:
        return result.result()
    except Exception as exc:
        raise APIError(500, f"{what} generation failed: {type(exc).__name__}: {exc}",
                       type="server_error") from exc


def json_response(build: Callable[[], dict[str, Any]]) -> Awaitable[Response]:
    """A JSON answer built and encoded in a worker thread: base64 of many megabytes of
    PNG or MP4 must not hold the event loop."""

    def encode() -> Response:
        body = json.dumps(build(), ensure_ascii=False).encode()
        return Response(body, media_type="application/json")

    return asyncio.to_thread(encode)


# the values OpenAI's images API takes for the fields this server accepts and ignores
IGNORED_CHOICES = {
    "quality": ("auto", "low", "medium", "high", "standard", "hd"),
    "style": ("vivid", "natural"),
    "moderation": ("auto", "low"),
}


def _check_ignored_fields(body: ImageGenerationRequest) -> None:
    for name, choices in IGNORED_CHOICES.items():
        value = getattr(body, name)
        if value is not None and value not in choices:
            raise ImageRequestError(f"{name} must be one of {', '.join(choices)}", name)
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise ImageRequestError("output_compression must be in [0, 100] (a png answer "
                                "ignores it)", "output_compression")


def image_request(body: ImageGenerationRequest, max_images: int) -> ImageRequest:
    _check_ignored_fields(body)
    if body.response_format not in (None, "b64_json"):
        raise ImageRequestError("response_format must be b64_json (no files are kept for "
                                "url answers)", "response_format")
    if body.output_format not in (None, "png"):
        raise ImageRequestError("output_format must be png", "output_format")
    if body.background not in (None, "auto", "opaque"):
        raise ImageRequestError("background must be auto or opaque (no transparency)",
                                "background")
    width, height = parse_size(None if body.size == "auto" else body.size, body.aspect)
    request = ImageRequest(prompt=body.prompt, n=1 if body.n is None else body.n,
                           width=width, height=height,
                           steps=body.steps, guidance_scale=body.guidance_scale,
                           negative_prompt=body.negative_prompt, seed=body.seed)
    validate(request, max_images)
    return request


async def generate(body: ImageGenerationRequest, service: DiffusionService | None,
                   max_images: int, is_disconnected: IsDisconnected,
                   timeout_s: float) -> Response:
    if service is None or not service.enabled:
        raise APIError(404, "this server serves no image model (set Z_IMAGE_MODEL_DIR, "
                            "Z_IMAGE_MODEL_ID or IMAGE_MODEL_ID)", code="model_not_found")
    model = body.model or service.default_model
    if model not in service.model_names():
        raise APIError(404, f"the image model '{model}' is not served; served: "
                            f"{', '.join(service.model_names())}", param="model",
                       code="model_not_found")
    try:
        request = image_request(body, max_images)
    except ImageRequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    images = await run_job(lambda: service.submit_image(model, request), "image",
                           is_disconnected, timeout_s)
    return await json_response(lambda: {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(png_bytes(image)).decode(),
                  "revised_prompt": None} for image in images],
        "size": f"{request.width}x{request.height}",
        "model": model,
        "output_format": "png",
    })
