"""Text-to-video and image-to-video over diffusers pipelines (Wan first), and their encodings.

`VideoRequest` holds one validated job; `generate_video` runs it with a seeded generator and
returns uint8 frames [F, H, W, 3]. Frames leave as PNGs (`frames_png`) or one H.264 (or
MPEG-4 Part 2 when the bundled FFmpeg lacks x264) MP4 (`mp4_bytes`, through PyAV).
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.diffusion.images import (
    ImageRequestError,
    check_size,
    png_bytes,
    seeded_generator,
    stop_between_steps,
)
from backend.vlm.images import ImageInputError, ImagePolicy, data_url_bytes, decode_image

DEFAULT_FRAMES = 81
MAX_FRAMES = 129
MAX_VIDEO_PIXELS = 1280 * 720 * 81  # Wan 2.1's largest: 81 frames of 720p
FRAME_STRIDE = 4  # Wan's VAE packs 4 frames per latent after the first: 4k + 1 frames
DEFAULT_FPS = 16
MAX_FPS = 60
DEFAULT_VIDEO_SIZE = (832, 480)
MAX_STEPS = 100
VIDEO_FORMATS = ("frames_b64_png", "b64_mp4")
_DATA_URL_PREFIX = "data:image/"


@dataclass(frozen=True)
class VideoRequest:
    prompt: str
    image: Image.Image | None = None  # image-to-video: the first frame
    num_frames: int = DEFAULT_FRAMES
    fps: int = DEFAULT_FPS
    width: int = DEFAULT_VIDEO_SIZE[0]
    height: int = DEFAULT_VIDEO_SIZE[1]
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


def validate_video(request: VideoRequest) -> None:
    check_size(request.width, request.height)
    if not request.prompt.strip():
        raise ImageRequestError("prompt must not be empty", "prompt")
    frames = request.num_frames
    if not 1 <= frames <= MAX_FRAMES or (frames - 1) % FRAME_STRIDE:
        raise ImageRequestError(
            f"num_frames must be 4k + 1 between 1 and {MAX_FRAMES} (e.g. 49, 81), got {frames}",
            "num_frames")
    if request.width * request.height * frames > MAX_VIDEO_PIXELS:
        raise ImageRequestError(
            f"width x height x num_frames must be at most {MAX_VIDEO_PIXELS:,} (81 frames of "
            f"1280x720), got {request.width}x{request.height}x{frames}", "num_frames")
    if not 1 <= request.fps <= MAX_FPS:
        raise ImageRequestError(f"fps must be between 1 and {MAX_FPS}", "fps")
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise ImageRequestError(f"steps must be between 1 and {MAX_STEPS}", "steps")
    if request.guidance_scale is not None and not 0.0 <= request.guidance_scale <= 30.0:
        raise ImageRequestError("guidance_scale must be in [0, 30]", "guidance_scale")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise ImageRequestError("seed must be a non-negative 64-bit integer", "seed")


def image_from_data_url(url: str, policy: ImagePolicy) -> Image.Image:
    """The picture of a `data:image/...;base64,` URL (the only kind accepted: a request never
    makes the server fetch a remote address or read a file), under the byte and pixel caps
    of chat images (`policy`: `ImagePolicy.from_config`, VLM_MAX_IMAGE_BYTES/PIXELS)."""
    if not url.startswith(_DATA_URL_PREFIX) or ";base64," not in url:
        raise ImageRequestError("image_url must be a data:image/...;base64, URL", "image_url")
    try:
        return decode_image(data_url_bytes(url, policy.max_bytes), policy)
    except ImageInputError as exc:
        raise ImageRequestError(f"image_url: {exc}", "image_url") from None


def generate_video(pipeline: Any, request: VideoRequest, device: torch.device,
                   stop: threading.Event | None = None) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of one request; with `stop`, the job ends (JobCancelled)
    at the first step after it is set."""
    kwargs: dict[str, Any] = {
        "prompt": request.prompt, "height": request.height, "width": request.width,
        "num_frames": request.num_frames, "generator": seeded_generator(request.seed, device),
        "output_type": "np",
    }
    if stop is not None:
        kwargs["callback_on_step_end"] = stop_between_steps(stop)
    if request.image is not None:
        kwargs["image"] = request.image.resize((request.width, request.height))
    if request.steps is not None:
        kwargs["num_inference_steps"] = request.steps
    if request.guidance_scale is not None:
        kwargs["guidance_scale"] = request.guidance_scale
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        frames = np.asarray(pipeline(**kwargs).frames[0])
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def frames_png(frames: np.ndarray) -> list[bytes]:
    return [png_bytes(Image.fromarray(frame)) for frame in frames]


def mp4_bytes(frames: np.ndarray, fps: int) -> bytes:
    """One MP4 of the frames (yuv420p; every size here is a multiple of 16)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()
