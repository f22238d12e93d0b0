"""POST /v1/images/generations: OpenAI's images API over the diffusion service.

Fields: `prompt`, `n`, `size` ("WxH") or `aspect` (a preset), `response_format` (only
`b64_json`: the server keeps no files to link to), `model` (a configured image model), and
the extensions `seed`, `steps`, `guidance_scale`, `negative_prompt`. The job runs on the
diffusion worker; this coroutine only awaits its future, so LLM streams keep flowing.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.errors import APIError
from backend.diffusion.images import (
    ImageRequest,
    ImageRequestError,
    parse_size,
    png_bytes,
    validate,
)
from backend.diffusion.service import DiffusionBusy, DiffusionService


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    aspect: str | None = None
    response_format: str = "b64_json"
    quality: str | None = None  # accepted for OpenAI compatibility, ignored
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(default=None)
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None


async def run_job(submit: Callable[[], concurrent.futures.Future[Any]], what: str) -> Any:
    """Queue a diffusion job and await it off the event loop: a full queue is a 429 with
    Retry-After, a failed job a 500."""
    try:
        future = submit()
    except DiffusionBusy as exc:
        raise APIError(429, str(exc), code="server_busy", headers={"Retry-After": "5"}) from None
    try:
        return await asyncio.wrap_future(future)
    except Exception as exc:
        raise APIError(500, f"{what} generation failed: {type(exc).__name__}: {exc}",
                       type="server_error") from exc


def _image_request(body: ImageGenerationRequest, max_images: int) -> ImageRequest:
    if body.response_format != "b64_json":
        raise ImageRequestError("response_format must be b64_json (no files are kept for "
                                "url answers)", "response_format")
    width, height = parse_size(body.size, body.aspect)
    request = ImageRequest(prompt=body.prompt, n=body.n, width=width, height=height,
                           steps=body.steps, guidance_scale=body.guidance_scale,
                           negative_prompt=body.negative_prompt, seed=body.seed)
    validate(request, max_images)
    return request


async def generate(body: ImageGenerationRequest, service: DiffusionService | None,
                   max_images: int) -> dict[str, Any]:
    if service is None or not service.enabled:
        raise APIError(404, "this server serves no image model (set Z_IMAGE_MODEL_DIR, "
                            "Z_IMAGE_MODEL_ID or IMAGE_MODEL_ID)", code="model_not_found")
    model = body.model or service.default_model
    if model not in service.model_names():
        raise APIError(404, f"the image model '{model}' is not served; served: "
                            f"{', '.join(service.model_names())}", param="model",
                       code="model_not_found")
    try:
        request = _image_request(body, max_images)
    except ImageRequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    images = await run_job(lambda: service.submit_image(model, request), "image")
    encoded = await asyncio.to_thread(lambda: [png_bytes(image) for image in images])
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(data).decode(), "revised_prompt": None}
                 for data in encoded],
        "size": f"{request.width}x{request.height}",
        "model": model,
    }
