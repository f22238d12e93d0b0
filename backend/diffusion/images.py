"""Text-to-image over diffusers pipelines: Z-Image-Turbo first, any diffusers image pipeline.

A pipeline is loaded from an operator flag only (a folder or a hub id in Z_IMAGE_MODEL_DIR,
Z_IMAGE_MODEL_ID or IMAGE_MODEL_ID); requests choose among loaded names. `ImageRequest`
holds one validated job; `generate_images` runs it as one batched pipeline call (the `n`
images of a prompt together) with a seeded generator, so a seed reproduces its pixels.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

Z_IMAGE_STEPS = 9  # 8 transformer evaluations: the flow-matching scheduler's last step is free
Z_IMAGE_GUIDANCE = 0.0  # Turbo is distilled: no classifier-free guidance
DEFAULT_SIZE = 1024
SIZE_MULTIPLE = 16  # VAE stride 8 x transformer patch 2
MIN_SIZE, MAX_SIZE = 32, 2048
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
# width x height at about one megapixel, multiples of SIZE_MULTIPLE
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1280, 720),
    "9:16": (720, 1280),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
}


class ImageRequestError(ValueError):
    """A bad image request; `param` names the field (the server's 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int | None = None  # None: the pipeline's default (Z-Image: Z_IMAGE_STEPS)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None


def parse_size(size: str | None, aspect: str | None) -> tuple[int, int]:
    """(width, height) from an OpenAI `size` ("1024x768") or an `aspect` preset."""
    if size and aspect:
        raise ImageRequestError("give either size or aspect, not both", "size")
    if aspect:
        if aspect not in ASPECT_PRESETS:
            raise ImageRequestError(
                f"aspect must be one of {', '.join(ASPECT_PRESETS)}", "aspect")
        return ASPECT_PRESETS[aspect]
    if not size:
        return DEFAULT_SIZE, DEFAULT_SIZE
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size.lower(), flags=re.ASCII)
    if match is None:
        raise ImageRequestError(f"size must look like 1024x1024, got {size[:40]!r}", "size")
    width, height = int(match[1]), int(match[2])
    check_size(width, height)
    return width, height


def check_size(width: int, height: int) -> None:
    for side in (width, height):
        if not MIN_SIZE <= side <= MAX_SIZE or side % SIZE_MULTIPLE:
            raise ImageRequestError(
                f"each side must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}], "
                f"got {width}x{height}", "size")


def validate(request: ImageRequest, max_images: int) -> None:
    check_size(request.width, request.height)
    if not request.prompt.strip():
        raise ImageRequestError("prompt must not be empty", "prompt")
    if not 1 <= request.n <= max_images:
        raise ImageRequestError(f"n must be between 1 and {max_images}", "n")
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise ImageRequestError(f"steps must be between 1 and {MAX_STEPS}", "steps")
    if request.guidance_scale is not None and not 0.0 <= request.guidance_scale <= MAX_GUIDANCE:
        raise ImageRequestError(f"guidance_scale must be in [0, {MAX_GUIDANCE:g}]",
                                "guidance_scale")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise ImageRequestError("seed must be a non-negative 64-bit integer", "seed")


def is_z_image(pipeline: Any) -> bool:
    return type(pipeline).__name__.startswith("ZImage")


def load_pipeline(source: str, device: torch.device, dtype: torch.dtype, *,
                  attention_backend: str = "", compile_transformer: bool = False,
                  cpu_offload: bool = False) -> Any:
    """A diffusers pipeline from a folder or hub id (model_index.json picks the class)."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(source, dtype=dtype)
    if cpu_offload and device.type == "cuda":
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.to(device)
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    if attention_backend and denoiser is not None:
        denoiser.set_attention_backend(attention_backend)
    if compile_transformer and denoiser is not None:
        denoiser.compile()
    logger.info("image pipeline %s from %s on %s (%s)", type(pipeline).__name__, source,
                device, dtype)
    return pipeline


class JobCancelled(Exception):
    """A diffusion job stopped between denoising steps (its client left, or its time ran
    out)."""


def stop_between_steps(stop: threading.Event) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` that ends the job once `stop` is set."""

    def callback(pipeline: Any, step: int, timestep: Any,
                 tensors: dict[str, Any]) -> dict[str, Any]:
        if stop.is_set():
            raise JobCancelled(f"stopped after denoising step {step + 1}")
        return tensors

    return callback


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The job's own generator: `seed`, else a fresh random one (never torch's global
    generators, which other threads may have seeded)."""
    generator = torch.Generator("cpu" if device.type == "mps" else device)
    return generator.manual_seed(seed if seed is not None else secrets.randbits(63))


def generate_images(pipeline: Any, request: ImageRequest, device: torch.device,
                    progress: bool = False, stop: threading.Event | None = None) -> list[Any]:
    """PIL images of one request: its `n` images in one batched pipeline call; with
    `stop`, the job ends (JobCancelled) at the first step after it is set."""
    z_image = is_z_image(pipeline)
    steps = request.steps or (Z_IMAGE_STEPS if z_image else None)
    guidance = request.guidance_scale
    if guidance is None and z_image:
        guidance = Z_IMAGE_GUIDANCE
    kwargs: dict[str, Any] = {
        "prompt": request.prompt, "height": request.height, "width": request.width,
        "num_images_per_prompt": request.n, "generator": seeded_generator(request.seed, device),
    }
    if stop is not None:
        kwargs["callback_on_step_end"] = stop_between_steps(stop)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    pipeline.set_progress_bar_config(disable=not progress)
    with torch.inference_mode():
        return list(pipeline(**kwargs).images)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_dummy_pipeline(folder: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A pipeline of the architecture in `folder` (model_index.json and each component's
    config; weights, if any, are ignored) with random weights, built on `device`: for
    benchmarks of real architectures without their checkpoints. Tokenizers and schedulers
    load as usual."""
    import json
    from pathlib import Path

    import diffusers
    import transformers

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    parts: dict[str, Any] = {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):
            parts[name] = spec  # a plain argument such as boundary_ratio
            continue
        library, class_name = spec
        if class_name is None:
            parts[name] = None
            continue
        module = diffusers if library == "diffusers" else transformers
        cls = getattr(module, class_name)
        sub = str(root / name)
        if "Scheduler" in class_name:
            parts[name] = cls.from_config(cls.load_config(sub))
        elif library == "diffusers":
            with torch.device(device):
                parts[name] = cls.from_config(cls.load_config(sub)).to(dtype)
        elif hasattr(cls, "_from_config"):
            config = transformers.AutoConfig.from_pretrained(sub)
            with torch.device(device):
                parts[name] = cls._from_config(config, dtype=dtype)
        else:  # tokenizers, processors
            parts[name] = cls.from_pretrained(sub)
    pipeline = pipeline_class(**parts).to(device)
    with torch.no_grad():  # tensors a module allocates with torch.empty: keep them finite
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in [*component.parameters(), *component.buffers()]:
                    if tensor.is_floating_point():
                        torch.nan_to_num_(tensor, nan=0.0, posinf=1.0, neginf=-1.0)
    return pipeline
