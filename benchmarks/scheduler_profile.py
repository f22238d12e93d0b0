"""The scheduler's host work per step, without a model: what a GPU step must hide.

    python3 -m benchmarks.scheduler_profile                       # shared_prefix, 1,024 requests
    python3 -m benchmarks.scheduler_profile --workload offline --top 15

A `Scheduler` on the CPU (slot table included) is driven through a workload's requests as
the engine would drive it (schedule, a token per sampled request, cache prompts, release the
finished) with no forward at all, under cProfile. Printed: host milliseconds per step,
mixed (prefill) steps apart from decode steps, and the functions that cost the most in each.
On CUDA the engine overlaps this with the previous step's device time (overlap scheduling),
so a step kind whose figure here approaches its device time is one the host holds back. The
CPU slot-table gather (`torch.cat`) is this machine's stand-in for the CUDA kernel. As in
the engine, what exists before the first request (torch, the tables) is frozen out of the
garbage collector's passes: without that, offline's mixed steps read ~60% higher here
(12.4 against 7.6 ms).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import time

import torch

from benchmarks.workloads import BenchRequest, random_requests, shared_prefix_requests
from config import Config
from engine.request import Req
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["shared_prefix", "offline"],
                        default="shared_prefix")
    parser.add_argument("--chunked-prefill-size", type=int, default=8192, help="CUDA's default")
    parser.add_argument("--cascade-min-prefix", type=int, default=256, help="0: cascade off")
    parser.add_argument("--num-prompts", type=int, default=0,
                        help="requests (default: the workload's own, 1,024 or 256)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per step kind")
    return parser.parse_args()


def workload(name: str, num_prompts: int) -> list[BenchRequest]:
    if name == "offline":
        return random_requests(num_prompts or 256, input_range=(100, 1024),
                               output_range=(100, 1024), vocab_size=150_000)
    groups = -(-num_prompts // 16) if num_prompts else 64
    return shared_prefix_requests(num_groups=groups, prompts_per_group=16, system_len=2048,
                                  question_len=128, output_len=256, vocab_size=150_000)


def main() -> None:
    args = parse_args()
    config = Config(max_running_requests=256, chunked_prefill_size=args.chunked_prefill_size)
    scheduler = Scheduler(config, num_slots=1_000_000, device=torch.device("cpu"),
                          max_context_len=40960, cascade_min_prefix=args.cascade_min_prefix)
    # as the engine does at start-up: what exists now is out of the collector's full passes
    gc.collect()
    gc.freeze()
    for index, request in enumerate(workload(args.workload, args.num_prompts)):
        params = SamplingParams(max_new_tokens=request.max_new_tokens, ignore_eos=True)
        scheduler.add(Req(rid=str(index), prompt_ids=request.prompt_ids, params=params,
                          sink=lambda delta: None))
    stats: dict[str, pstats.Stats] = {}
    seconds = {"mixed": 0.0, "decode": 0.0}
    steps = {"mixed": 0, "decode": 0}
    while scheduler.has_work:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        plan = scheduler.schedule()
        if plan is None or plan.batch is None:
            break
        for req in plan.sample_reqs:  # stand-in for sampling: one token each
            req.token_ids.append(5)
            if req.num_output >= req.params.max_new_tokens:
                req.finish_reason = "length"
        scheduler.cache_prompts(plan, None)
        scheduler.release_finished(plan.sample_reqs)
        profile.disable()
        kind = "decode" if plan.batch.is_decode else "mixed"
        seconds[kind] += time.perf_counter() - start
        steps[kind] += 1
        if kind in stats:
            stats[kind].add(profile)
        else:
            stats[kind] = pstats.Stats(profile)
    for kind in ("mixed", "decode"):
        count = max(steps[kind], 1)
        print(f"{kind:7} steps {steps[kind]:5}  host {seconds[kind] * 1000 / count:7.2f} ms/step "
              f"(profiled)")
        if kind in stats:
            stream = io.StringIO()
            stats[kind].stream = stream  # type: ignore[attr-defined]
            stats[kind].sort_stats("tottime").print_stats(args.top)
            print(stream.getvalue())


if __name__ == "__main__":
    main()
