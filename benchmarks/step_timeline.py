"""Where a workload's wall time goes, step by step: prefill (or mixed) steps against decode
steps, device time against wall time, and how the batch shrinks over the run.

    python3 -m benchmarks.step_timeline --model model_configs/qwen3-0.6b --load-format dummy
    python3 -m benchmarks.step_timeline --workload shared_prefix --model ... --load-format dummy
    python3 -m benchmarks.step_timeline --num-prompts 16 --max-input 64 --max-output 32  # CPU

Each step's forward is timed: on CUDA with events around it (device time, from its first
launch to its last kernel), everywhere by the host clock between step starts (wall). A step
whose wall time is well above its device time is waiting for the host; a run whose decode
steps show wall ≈ device is bound by the device. The engine is the real one, with the
workload's own requests (`benchmarks/workloads.py`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.measure import engine_requests
from benchmarks.workloads import BenchRequest, random_requests, shared_prefix_requests
from config import load_config
from engine.engine import Engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["offline", "shared_prefix"], default="offline")
    parser.add_argument("--model", default="", help="folder (default: the embedded model)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--num-prompts", type=int, default=256,
                        help="offline: requests; shared_prefix: groups x 16")
    parser.add_argument("--max-input", type=int, default=1024)
    parser.add_argument("--max-output", type=int, default=1024)
    parser.add_argument("--parts", type=int, default=4, help="slices of the run to summarise")
    return parser.parse_args(argv)


@dataclass
class Step:
    start: float  # host clock when the step's forward was queued
    decode: bool
    batch_size: int
    num_tokens: int
    events: tuple[Any, Any] | None  # CUDA start/end events


class StepRecorder:
    """Wraps the engine's `_forward` (on its loop thread) to record every step."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[Step] = []
        self.inner = engine._forward
        self.cuda = engine.runner.device.type == "cuda"
        engine._forward = self  # type: ignore[method-assign]

    def __call__(self, plan: Any) -> Any:
        events = None
        if self.cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        start = time.perf_counter()
        logits = self.inner(plan)
        if events is not None:
            events[1].record()
        batch = plan.batch
        self.steps.append(Step(start, bool(batch is not None and batch.is_decode),
                               batch.batch_size if batch is not None else 0,
                               batch.num_tokens if batch is not None else 0, events))
        return logits


def workload_requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    if args.workload == "shared_prefix":
        return shared_prefix_requests(
            num_groups=max(1, args.num_prompts // 16), prompts_per_group=16, system_len=2048,
            question_len=128, output_len=min(args.max_output, 256), vocab_size=vocab_size)
    low_in, low_out = min(100, args.max_input), min(100, args.max_output)
    return random_requests(args.num_prompts, input_range=(low_in, args.max_input),
                           output_range=(low_out, args.max_output), vocab_size=vocab_size)


def summarise(steps: list[Step], end: float, parts: int) -> list[str]:
    """Per step kind, then per slice of the run: steps, device and wall seconds, batch."""
    walls = [b.start - a.start for a, b in zip(steps, steps[1:])] + [end - steps[-1].start]
    devices = [s.events[0].elapsed_time(s.events[1]) / 1000 if s.events else None
               for s in steps]

    def line(label: str, rows: list[int]) -> str:
        if not rows:
            return f"{label:16s} no steps"
        device = [devices[i] for i in rows]
        dev = ("-" if any(d is None for d in device)
               else f"{sum(d for d in device if d is not None):7.2f}s")
        wall = sum(walls[i] for i in rows)
        batch = sum(steps[i].batch_size for i in rows) / len(rows)
        tokens = sum(steps[i].num_tokens for i in rows) / len(rows)
        return (f"{label:16s} steps {len(rows):5d}  device {dev:>8s}  wall {wall:7.2f}s "
                f"(avg {wall / len(rows) * 1000:7.2f} ms)  batch {batch:6.1f}  "
                f"tokens {tokens:8.1f}")

    kinds: dict[str, list[int]] = defaultdict(list)
    for i, step in enumerate(steps):
        kinds["decode" if step.decode else "prefill/mixed"].append(i)
    lines = [line(kind, rows) for kind, rows in sorted(kinds.items())]
    size = max(1, -(-len(steps) // parts))
    for part in range(parts):
        rows = list(range(part * size, min(len(steps), (part + 1) * size)))
        if rows:
            lines.append(line(f"part {part + 1}/{parts}", rows))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, LOAD_FORMAT=args.load_format)
    if args.model:
        env["MODEL_LOCAL_DIR"] = args.model
    engine = Engine(load_config(env))
    try:
        requests = workload_requests(args, engine.info.vocab_size)
        engine.warmup()
        recorder = engine.call(lambda: StepRecorder(engine))
        stats = engine_requests(engine, requests, f"engine: {args.workload}")
        end = time.perf_counter()
        if recorder.cuda:
            torch.cuda.synchronize()
        steps = engine.call(lambda: list(recorder.steps))
    finally:
        engine.shutdown()
    print(f"{args.workload}: {stats.num_requests} requests, {stats.output_tokens} output "
          f"tokens in {stats.wall_s:.2f} s ({stats.output_tok_s:,.1f} tok/s), "
          f"{len(steps)} steps on {engine.runner.device}")
    for text in summarise(steps, end, args.parts):
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
