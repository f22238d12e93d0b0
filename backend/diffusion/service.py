"""Diffusion jobs beside the LLM: one job at a time per device, a bounded queue before it.

`DiffusionService` owns the loaded pipelines (image models, and the text-to-video and
image-to-video models) and one worker thread. `submit_image` / `submit_video` return a
`DiffusionJob` at once: its future (the server awaits it with `asyncio.wrap_future`, so the
event loop and the LLM streams never wait for a job) and `cancel()`, which drops a waiting
job and stops a running one between denoising steps (a client that left, a time limit).
With DIFFUSION_QUEUE jobs already waiting a submit raises `DiffusionBusy` (the server's 429).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.diffusion.images import ImageRequest, JobCancelled, generate_images, load_pipeline
from backend.diffusion.video import VideoRequest, generate_video
from config import Config, resolve_device

logger = logging.getLogger(__name__)


class DiffusionBusy(Exception):
    """The job queue is full."""


def _cancelled_run(stop: threading.Event) -> None:
    """What a job cancelled while waiting runs: nothing (the worker skips it anyway)."""


@dataclass
class DiffusionJob:
    """A queued job: its result's future, and the event that stops it between steps."""

    run: Callable[[threading.Event], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    stop: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Drop the job if it still waits (its request freed at once: the shell left in the
        queue holds nothing); stop it at its next denoising step if it runs."""
        self.stop.set()
        if self.future.cancel():
            self.run = _cancelled_run




@dataclass(frozen=True)
class ImageModel:
    """A configured image model: the name requests use, and where it loads from."""

    name: str
    source: str


def configured_image_models(config: Config) -> list[ImageModel]:
    """Z_IMAGE_MODEL_DIR / Z_IMAGE_MODEL_ID first (the default), then IMAGE_MODEL_ID, then the
    IMAGE_MODEL_ALLOW list. Names are the folder's or the hub id's last part."""
    sources = [config.z_image_model_dir or config.z_image_model_id, config.image_model_id,
               *config.image_model_allow.split(",")]
    models: list[ImageModel] = []
    for source in (s.strip() for s in sources):
        if source and all(m.source != source for m in models):
            models.append(ImageModel(source.rstrip("/").split("/")[-1], source))
    return models


def configured_video_models(config: Config) -> dict[str, ImageModel]:
    """`t2v` from VIDEO_MODEL_ID and `i2v` from VIDEO_I2V_MODEL_ID, where set."""
    sources = {"t2v": config.video_model_id.strip(), "i2v": config.video_i2v_model_id.strip()}
    return {kind: ImageModel(source.rstrip("/").split("/")[-1], source)
            for kind, source in sources.items() if source}


def diffusion_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.diffusion_dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[config.diffusion_dtype]
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.float32


class DiffusionService:
    """Loaded image pipelines and the worker that runs their jobs one at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.models = configured_image_models(config)
        self.video_models = configured_video_models(config)
        self.device = resolve_device(config.diffusion_device)
        self.dtype = diffusion_dtype(config, self.device)
        self._pipelines: dict[str, Any] = {}
        self._jobs: queue.SimpleQueue[DiffusionJob | None] = queue.SimpleQueue()
        self._waiting = 0  # jobs queued and not cancelled: DIFFUSION_QUEUE bounds these
        self._lock = threading.Lock()
        self.num_cancelled = 0  # jobs dropped while waiting or stopped between steps
        self._thread = threading.Thread(target=self._work, name="diffusion", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return bool(self.models)

    @property
    def has_video(self) -> bool:
        return bool(self.video_models)

    @property
    def default_model(self) -> str:
        return self.models[0].name

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def load_all(self) -> None:
        """Load every configured model now (at start-up, before any LLM engine runs: loading
        while another thread runs torch ops is not safe, see api/server.py)."""
        for model in [*self.models, *self.video_models.values()]:
            self._load(model)

    def submit_image(self, model: str, request: ImageRequest) -> DiffusionJob:
        """Queue an image job; its future resolves to the list of PIL images."""
        source = next(m for m in self.models if m.name == model)
        return self._submit(DiffusionJob(
            lambda stop: generate_images(self._load(source), request, self.device, stop=stop)))

    def submit_video(self, kind: str, request: VideoRequest) -> DiffusionJob:
        """Queue a `t2v` or `i2v` job; its future resolves to uint8 frames [F, H, W, 3]."""
        source = self.video_models[kind]
        return self._submit(DiffusionJob(
            lambda stop: generate_video(self._load(source), request, self.device, stop=stop)))

    def _submit(self, job: DiffusionJob) -> DiffusionJob:
        with self._lock:
            if self._waiting >= self.config.diffusion_queue:
                raise DiffusionBusy(f"the image queue is full ({self._waiting} waiting); "
                                    "retry later")
            self._waiting += 1
        job.future.add_done_callback(self._cancelled_while_waiting)
        self._jobs.put(job)
        return job

    def _cancelled_while_waiting(self, future: concurrent.futures.Future[Any]) -> None:
        """A job leaves the count when it starts (`_run`) or when it is cancelled while it
        waits (once: a running job's future cannot be cancelled)."""
        if future.cancelled():
            self._left()

    def _left(self) -> None:
        with self._lock:
            self._waiting -= 1

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _load(self, model: ImageModel) -> Any:
        if model.source not in self._pipelines:
            config = self.config
            self._pipelines[model.source] = load_pipeline(
                model.source, self.device, self.dtype,
                attention_backend=config.diffusion_attention_backend,
                compile_transformer=config.diffusion_compile,
                cpu_offload=config.diffusion_cpu_offload)
        return self._pipelines[model.source]

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)
            del job  # nothing of a finished job stays alive while the worker waits

    def _run(self, job: DiffusionJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            self.num_cancelled += 1  # cancelled while it waited (and counted out then)
            return
        self._left()
        try:
            result = job.run(job.stop)
        except JobCancelled as exc:
            self.num_cancelled += 1
            logger.info("diffusion job cancelled: %s", exc)
            job.future.set_exception(exc.with_traceback(None))
        except Exception as exc:
            logger.exception("diffusion job failed")
            # without its traceback: the frames it holds would keep the job's tensors alive
            job.future.set_exception(exc.with_traceback(None))
        else:
            job.future.set_result(result)
