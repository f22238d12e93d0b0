"""Is the first offline run after warm-up slower than later ones with the radix cache flushed
between runs? Lists Triton cache entries and allocator segments added by each run."""
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import bench_suite as bs
from backend.factory import create_engine
from backend.loader import resolve_model
from benchmarks.context import BenchContext
from benchmarks.measure import engine_requests


def triton_entries() -> set[str]:
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return {p.name for p in root.rglob("*.json") if not p.name.startswith("__grp__")}


def main():
    args = bs.parse_args(["offline", "--skip-baseline", *sys.argv[1:]])
    config = bs.build_config(args)
    ctx = BenchContext(args, config, resolve_model(config))
    reqs = bs.offline_requests(ctx)
    engine = create_engine(config, source=ctx.source)
    engine.warmup()
    seen = triton_entries()
    for rep in range(3):
        engine.flush_cache()
        segs = (torch.cuda.memory_stats() if torch.cuda.is_available() else {}).get("segment.all.allocated", 0)
        t = time.perf_counter()
        stats = engine_requests(engine, reqs, f"run {rep}")
        new = triton_entries() - seen
        seen |= new
        segs2 = (torch.cuda.memory_stats() if torch.cuda.is_available() else {}).get("segment.all.allocated", 0)
        print(f"run {rep}: {stats.output_tok_s:,.0f} tok/s wall {stats.wall_s:.3f} s cached "
              f"{stats.cached_tokens} | new triton {sorted(new)} | segments +{segs2 - segs}",
              flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
