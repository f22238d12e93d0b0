"""POST /v1/videos/generations: text-to-video and image-to-video over the diffusion service.

Fields: `prompt`, optional `image_url` (a `data:image/...;base64,` URL: image-to-video from
that first frame), `num_frames` (4k + 1), `fps`, `size` ("WxH"), `response_format`
(`b64_mp4` or `frames_b64_png`), and `seed`, `steps`, `guidance_scale`, `negative_prompt`.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, StrictInt

from api.errors import APIError
from api.images_api import IsDisconnected, json_response, run_job
from backend.diffusion.images import ImageRequestError, parse_size
from backend.diffusion.service import DiffusionService
from backend.diffusion.video import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_VIDEO_SIZE,
    VIDEO_FORMATS,
    VideoRequest,
    frames_png,
    image_from_data_url,
    mp4_bytes,
    validate_video,
)
from backend.vlm.images import ImagePolicy


class VideoGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    image_url: str | None = None
    num_frames: StrictInt | None = None  # null: DEFAULT_FRAMES
    fps: StrictInt | None = None  # null: DEFAULT_FPS
    size: str | None = None
    response_format: str | None = None  # null: b64_mp4
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None


def _video_request(body: VideoGenerationRequest, policy: ImagePolicy) -> VideoRequest:
    if body.response_format is not None and body.response_format not in VIDEO_FORMATS:
        raise ImageRequestError(f"response_format must be one of {', '.join(VIDEO_FORMATS)}",
                                "response_format")
    width, height = parse_size(body.size, None) if body.size else DEFAULT_VIDEO_SIZE
    image = image_from_data_url(body.image_url, policy) if body.image_url is not None else None
    request = VideoRequest(prompt=body.prompt, image=image,
                           num_frames=DEFAULT_FRAMES if body.num_frames is None
                           else body.num_frames,
                           fps=DEFAULT_FPS if body.fps is None else body.fps,
                           width=width, height=height, steps=body.steps,
                           guidance_scale=body.guidance_scale,
                           negative_prompt=body.negative_prompt, seed=body.seed)
    validate_video(request)
    return request


async def generate(
    body: VideoGenerationRequest, service: DiffusionService | None,
    is_disconnected: IsDisconnected, timeout_s: float,
) -> Response:
    if service is None or not service.has_video:
        raise APIError(404, "this server serves no video model (set VIDEO_MODEL_ID or "
                            "VIDEO_I2V_MODEL_ID)", code="model_not_found")
    kind = "i2v" if body.image_url is not None else "t2v"
    if kind not in service.video_models:
        wanted = "image-to-video (VIDEO_I2V_MODEL_ID)" if kind == "i2v" else \
            "text-to-video (VIDEO_MODEL_ID)"
        raise APIError(400, f"this server has no {wanted} model", param="image_url")
    model = service.video_models[kind].name
    if body.model is not None and body.model != model:
        raise APIError(404, f"the video model '{body.model}' is not served; {kind}: {model}",
                       param="model", code="model_not_found")
    policy = ImagePolicy.from_config(service.config)
    try:  # decoding a first frame is work: off the event loop
        request = await asyncio.to_thread(_video_request, body, policy)
    except ImageRequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    frames = await run_job(lambda: service.submit_video(kind, request), "video",
                           is_disconnected, timeout_s)

    def answer() -> dict[str, Any]:
        if body.response_format in (None, "b64_mp4"):
            item: dict[str, Any] = {
                "b64_mp4": base64.b64encode(mp4_bytes(frames, request.fps)).decode()}
        else:
            item = {"frames_b64_png": [base64.b64encode(p).decode() for p in frames_png(frames)]}
        return {
            "created": int(time.time()),
            "data": [item],
            "model": model,
            "num_frames": int(frames.shape[0]),
            "fps": request.fps,
            "size": f"{request.width}x{request.height}",
        }

    return await json_response(answer)
