"""Where the two-GPU pool's offline run goes: each engine's requests, K/V work and finish
time inside the pool, then each engine's subset run alone on one GPU (cuda:0), then all."""
import functools
import sys
import threading
import time
from dataclasses import replace

import bench_suite as bs
from backend.factory import create_engine
from backend.loader import resolve_model
from benchmarks.context import BenchContext
from benchmarks.measure import greedy
from multi_device import EnginePool


def run(engine, requests, placed=None):
    done: dict[int, float] = {}
    ev = threading.Event()
    n = len(requests)

    def sink(i, delta):
        if delta.finished:
            done[i] = time.perf_counter()
            if len(done) == n:
                ev.set()
    start = time.perf_counter()
    for i, r in enumerate(requests):
        engine.submit(list(r.prompt_ids), greedy(r.max_new_tokens), functools.partial(sink, i))
    ev.wait()
    ends = {i: t - start for i, t in done.items()}
    return max(ends.values()), ends


def work(reqs):
    return sum(len(r.prompt_ids) * r.max_new_tokens + r.max_new_tokens ** 2 / 2 for r in reqs)


def main():
    args = bs.parse_args(["offline", "--skip-baseline", *sys.argv[1:]])
    config = bs.build_config(args)
    ctx = BenchContext(args, config, resolve_model(config))
    reqs = bs.offline_requests(ctx)
    total_out = sum(r.max_new_tokens for r in reqs)
    pool = EnginePool(replace(config, enable_multi_device=True))
    pool.warmup()
    placed: list[int] = []
    route = pool.route

    def spy(ids, weight=1):
        slot = route(ids, weight)
        placed.append(slot.index)
        return slot
    pool.route = spy
    subsets = {}
    for rep in range(2):
        placed.clear()
        wall, ends = run(pool, reqs)
        print(f"pool run {rep}: {wall:.3f} s {total_out / wall:,.0f} tok/s", flush=True)
        for e in sorted(set(placed)):
            idx = [i for i, p in enumerate(placed) if p == e]
            sub = [reqs[i] for i in idx]
            subsets[e] = sub
            print(f"  engine {e}: {len(sub)} reqs, in {sum(len(r.prompt_ids) for r in sub)}, "
                  f"out {sum(r.max_new_tokens for r in sub)}, max out {max(r.max_new_tokens for r in sub)}, "
                  f"kv work {work(sub) / 1e6:.1f}M, finish {max(ends[i] for i in idx):.3f} s", flush=True)
    pool.shutdown()
    del pool
    import torch
    torch.cuda.empty_cache()
    engine = create_engine(replace(config, enable_multi_device=False), source=ctx.source)
    engine.warmup()
    for e, sub in subsets.items():
        for rep in range(2):
            wall, _ = run(engine, sub)
            print(f"alone subset {e} run {rep}: {wall:.3f} s", flush=True)
    wall, _ = run(engine, reqs)
    print(f"alone all: {wall:.3f} s {total_out / wall:,.0f} tok/s", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
