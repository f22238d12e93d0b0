"""Unprofiled host time per engine phase (perf_counter around each), split by step kind, plus
garbage-collector pauses, over a whole workload run."""
import gc, os, sys, time
from collections import defaultdict
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import workload_requests, parse_args
from config import load_config
from engine.engine import Engine
W = os.environ.get("WORKLOAD", "offline")
args = parse_args(["--workload", W, "--num-prompts", os.environ.get("N", "1024" if W == "shared_prefix" else "256"), "--max-output", os.environ.get("MAXOUT", "1024")])
env = dict(os.environ, LOAD_FORMAT=os.environ.get("LF", "dummy"), MODEL_LOCAL_DIR=os.path.abspath(os.environ.get("MODEL", ".gpu/qwen3-dummy")))
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
acc = defaultdict(float); cnt = defaultdict(int)
kind = {"k": "decode"}
def timed(obj, name, sets_kind=False):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter()
        try:
            r = f(*a, **k)
            if sets_kind:
                kind["k"] = "decode" if r is None or r.batch is None or r.batch.is_decode else "mixed"
            return r
        finally:
            key = (kind["k"], name); acc[key] += time.perf_counter() - t; cnt[key] += 1
    setattr(obj, name, g)
timed(engine.scheduler, "schedule", sets_kind=True)
for n in ("_admit", "_plan", "cache_prompts", "_grow_decoding", "release_finished"):
    timed(engine.scheduler, n)
for n in ("_forward", "_read_in_flight", "_step"):
    timed(engine, n)
timed(engine.sampler, "sample_async")
gcs = defaultdict(float); gcn = defaultdict(int); gct = {}
def cb(phase, info):
    if phase == "start": gct["t"] = time.perf_counter()
    else: gcs[info["generation"]] += time.perf_counter() - gct.get("t", time.perf_counter()); gcn[info["generation"]] += 1
gc.callbacks.append(cb)
stats = engine_requests(engine, requests, "host")
gc.callbacks.remove(cb)
engine.shutdown()
print(f"{W}: {stats.output_tok_s:,.0f} tok/s, wall {stats.wall_s:.2f} s")
for k in ("mixed", "decode"):
    steps = cnt[(k, "schedule")]
    print(f"  {k}: {steps} steps (phase: total s, ms per step)")
    for n in ("_step", "schedule", "_admit", "_plan", "_grow_decoding", "_forward", "cache_prompts", "_read_in_flight", "release_finished", "sample_async"):
        if cnt[(k, n)]: print(f"    {n:18s} {acc[(k, n)]:7.3f} s {acc[(k, n)] * 1000 / max(1, steps):7.2f}")
print("  gc:", {g: f"{gcn[g]} x, {gcs[g]*1000:.1f} ms" for g in sorted(gcn)})
