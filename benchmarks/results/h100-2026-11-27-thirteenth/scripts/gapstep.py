"""Per step of a whole run: device time of the forward (CUDA events around it) and the device
time between the previous forward's end and this one's start (sampling + uploads + idle),
bucketed by step kind and batch size; shows where the device waits for the host."""
import os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import StepRecorder, workload_requests, parse_args
from config import load_config
from engine.engine import Engine
W = os.environ.get("WORKLOAD", "offline")
args = parse_args(["--workload", W, "--num-prompts", "1024" if W == "shared_prefix" else "256"])
env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.path.abspath(os.environ.get("MODEL", ".gpu/qwen3-dummy")))
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
rec = engine.call(lambda: StepRecorder(engine))
stats = engine_requests(engine, requests, "gap")
end = time.perf_counter(); torch.cuda.synchronize()
steps = engine.call(lambda: list(rec.steps))
engine.shutdown()
walls = [b.start - a.start for a, b in zip(steps, steps[1:])] + [end - steps[-1].start]
dev = [s.events[0].elapsed_time(s.events[1]) for s in steps]
gap = [0.0] + [steps[i - 1].events[1].elapsed_time(steps[i].events[0]) for i in range(1, len(steps))]
print(f"{W}: {stats.output_tok_s:,.0f} tok/s, {len(steps)} steps, device fwd {sum(dev)/1e3:.3f} s, between {sum(gap)/1e3:.3f} s, wall {sum(walls):.3f} s")
buckets = [(0, 1), (2, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256)]
for kind in ("mixed", "decode"):
    for lo, hi in buckets:
        rows = [i for i, s in enumerate(steps) if (s.decode == (kind == "decode")) and lo <= s.batch_size <= hi]
        if not rows: continue
        n = len(rows); d = sum(dev[i] for i in rows); g = sum(gap[i] for i in rows); w = sum(walls[i] for i in rows) * 1e3
        big = sum(gap[i] for i in rows if gap[i] > 0.2)
        print(f"  {kind:6s} b{lo:>3}-{hi:<3} steps {n:5d}  fwd {d/n:6.2f} ms  between {g/n:5.2f} ms (total {g:7.1f}, in >0.2ms gaps {big:6.1f})  wall {w/n:6.2f} ms")
