"""Where a decode step goes: the engine loop's host time by function, and the device time of
the forward, for one batch of greedy requests.

    python3 -m benchmarks.step_profile --model model_configs/qwen3-0.6b --load-format dummy
    python3 -m benchmarks.step_profile --batch 64 --top 30      # the embedded model, CPU
    python3 -m benchmarks.step_profile --model ... --batch 256 --shared-prefix 2048 \
        --group-size 16 --new-tokens 128 --kernels 30   # the shared_prefix workload's steps

The host side is cProfile on the engine's loop thread (enabled through `Engine.call`, so only
that thread is measured) over the whole run; figures are per step. On CUDA, events around
each `runner.forward` call give the device time from its first launch to its last kernel.
The profiler slows Python down (roughly 1.5-2x), so the host figures overstate its share;
compare functions with each other, and the step time with a run of `bench_suite.py`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from typing import Any

import torch

from config import load_config
from engine.engine import Engine
from engine.sampling_params import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="folder (default: the embedded model)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--batch", type=int, default=1, help="concurrent requests")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens each group of --group-size requests shares before its "
                             "own --prompt-len (cached beforehand: the radix cache's case)")
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    parser.add_argument("--kernels", type=int, default=0,
                        help="on CUDA, also list the N kernels with the most device time over "
                             "a second run (torch.profiler; CUDA graph replays included)")
    return parser.parse_args()


class ForwardTimer:
    """Wraps `runner.forward`: CUDA events around every call, read once at the end."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.inner = runner.forward
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        runner.forward = self

    def __call__(self, batch: Any) -> torch.Tensor:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = self.inner(batch)
        end.record()
        self.events.append((start, end))
        return logits

    def mean_ms(self) -> float:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in self.events]
        return sum(times) / len(times) if times else float("nan")


def main() -> None:
    args = parse_args()
    env = dict(os.environ)
    if args.model:
        env["MODEL_LOCAL_DIR"] = args.model
    env["LOAD_FORMAT"] = args.load_format
    engine = Engine(load_config(env))
    try:
        vocab = engine.info.vocab_size
        generator = torch.Generator().manual_seed(0)
        prompts = make_prompts(args, vocab, generator)
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        prime(engine, args, prompts)
        timer = ForwardTimer(engine.runner) if engine.runner.device.type == "cuda" else None
        profiler = cProfile.Profile()
        steps_before = engine.stats.num_steps
        engine.call(profiler.enable)
        start = time.perf_counter()
        engine.generate(prompts, params)
        wall = time.perf_counter() - start
        engine.call(profiler.disable)
        steps = engine.stats.num_steps - steps_before
        report(args, engine, profiler, steps, wall, timer)
        if args.kernels and timer is not None:
            engine.flush_cache()  # the same run again: the timed run's prompts not cached
            prime(engine, args, prompts)
            kernel_table(engine, prompts, params, steps, args.kernels)
    finally:
        engine.shutdown()


def prime(engine: Engine, args: argparse.Namespace, prompts: list[list[int]]) -> None:
    """Warm-up; with --shared-prefix, one request per group puts its prefix in the cache."""
    engine.generate(prompts[:: max(1, args.group_size)] if args.shared_prefix else prompts[:1],
                    SamplingParams(max_new_tokens=8, temperature=0.0))


def make_prompts(args: argparse.Namespace, vocab: int,
                 generator: torch.Generator) -> list[list[int]]:
    """`--batch` random prompts of `--prompt-len` tokens, each group of `--group-size` after a
    shared prefix of `--shared-prefix` tokens of its own."""
    def tokens(n: int) -> list[int]:
        return torch.randint(100, vocab - 1, (n,), generator=generator).tolist()

    prompts: list[list[int]] = []
    prefix: list[int] = []
    for index in range(args.batch):
        if args.shared_prefix and index % max(1, args.group_size) == 0:
            prefix = tokens(args.shared_prefix)
        prompts.append(prefix + tokens(args.prompt_len))
    return prompts


def report(args: argparse.Namespace, engine: Engine, profiler: cProfile.Profile, steps: int,
           wall: float, timer: ForwardTimer | None) -> None:
    shared = (f" after {args.shared_prefix} shared by {args.group_size}"
              if args.shared_prefix else "")
    print(f"{engine.model_name} on {engine.runner.device}, batch {args.batch}, "
          f"{args.prompt_len}-token prompts{shared}, {args.new_tokens} new tokens, overlap "
          f"{'on' if engine.overlap else 'off'}")
    print(f"steps {steps}, wall {wall * 1000 / steps:.3f} ms/step (profiled)")
    if timer is not None:
        print(f"device time of runner.forward: {timer.mean_ms():.3f} ms/step")
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(args.top)
    print(f"host time by function (tottime = own time over {steps} steps):")
    print(stream.getvalue())
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative").print_stats(args.top)
    print("host time by function, cumulative:")
    print(stream.getvalue())


def kernel_table(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                 steps: int, rows: int) -> None:
    """The same run again under torch.profiler: device time per kernel name, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    launches = sum(e.count for e in events)
    print(f"kernels: {launches / steps:.0f} launches and {total / steps / 1000:.3f} ms of device "
          f"time per step ({steps} steps)")
    print(f"{'us/step':>9} {'calls/step':>10} {'share':>6}  kernel")
    for event in events[:rows]:
        print(f"{event.device_time_total / steps:9.1f} {event.count / steps:10.1f} "
              f"{event.device_time_total / total:6.1%}  {event.key[:110]}")


if __name__ == "__main__":
    main()
