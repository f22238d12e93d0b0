"""One benchmark run's context: arguments, configuration and model; engine and baseline
lifetimes.

`with_engine` and `with_baseline` build one system, run a measurement on it and free its
memory before the next one is built, so two never share the device.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from backend.factory import create_engine
from backend.hf.baseline import HFBaseline
from backend.loader import ModelSource
from benchmarks.workloads import BenchRequest
from config import Config
from multi_device import AnyEngine, EnginePool, pool_devices

T = TypeVar("T")


@dataclass
class BenchContext:
    """One run's arguments, resolved configuration and model."""

    args: argparse.Namespace
    config: Config
    source: ModelSource

    @property
    def device(self) -> torch.device:
        return self.config.resolved_device()

    @property
    def dtype(self) -> torch.dtype:
        return self.config.resolved_dtype()

    @property
    def vocab_size(self) -> int:
        return int(self.source.hf_config.get_text_config().vocab_size)

    def baseline_dtype(self, default: torch.dtype) -> torch.dtype:
        name = self.args.baseline_dtype
        return default if name == "auto" else getattr(torch, name)

    def meta(self) -> dict[str, Any]:
        """Where and how the run happened (stored in the JSON)."""
        device = self.device
        return {
            "model": self.source.name,
            "model_path": self.source.path,
            "device": device.type,
            "device_name": _device_name(device),
            "dtype": dtype_name(self.dtype),
            "backend_impl": self.config.backend_impl,
            "load_format": self.config.load_format,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": dict(vars(self.args)),
        }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_engine(
    ctx: BenchContext, fn: Callable[[AnyEngine], T], config: Config | None = None
) -> T:
    """Build an engine (warmed up), run `fn` on it, shut it down and free its memory. When
    the config asks for several engines (ENABLE_MULTI_DEVICE, NUM_ENGINES, DEVICES), an
    EnginePool stands in for it and every request is routed (SCHEDULER_MODE)."""
    config = config or ctx.config
    engine: AnyEngine = (EnginePool(config) if len(pool_devices(config)) > 1
                         else create_engine(config, source=ctx.source))
    try:
        engine.warmup()
        return fn(engine)
    finally:
        engine.shutdown()
        del engine
        release_memory(ctx.device)


def with_baseline(
    ctx: BenchContext, dtype: torch.dtype, fn: Callable[[HFBaseline], T]
) -> T | None:
    """Run `fn` on the HF baseline (warmed up) unless --skip-baseline; then free it.

    The baseline runs on a thread of its own that then exits: a thread that ran torch ops
    keeps an OpenMP worker team, and a second team on a small CPU slows the engine's loop
    thread about 2x, which would skew every figure measured after the baseline."""
    if ctx.args.skip_baseline:
        return None

    def run() -> T:
        baseline = HFBaseline(
            ctx.source,
            dtype=dtype,
            device=ctx.device,
            load_format=ctx.config.load_format,
            trust_remote_code=ctx.config.trust_remote_code,
            seed=ctx.config.seed,
        )
        try:
            baseline.generate_batch([[1, 2, 3, 4]], 2)
            return fn(baseline)
        finally:
            del baseline
            release_memory(ctx.device)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-baseline") as pool:
        return pool.submit(run).result()


def baseline_subset(ctx: BenchContext, requests: list[BenchRequest]) -> list[BenchRequest]:
    limit = ctx.args.baseline_num_prompts
    return requests[:limit] if limit else requests


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
