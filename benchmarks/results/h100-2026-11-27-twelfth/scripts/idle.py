"""GPU idle time over a whole workload run, profiling CUDA activity only (no host ops, so the
host runs at nearly its own speed): span, busy, idle gaps by part of the run and by size."""
import gzip, json, os, sys, tempfile
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import workload_requests, parse_args
from config import load_config
from engine.engine import Engine
W = os.environ.get("WORKLOAD", "offline")
args = parse_args(["--workload", W, "--num-prompts", "1024" if W == "shared_prefix" else "256"])
env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.path.abspath(os.environ.get("MODEL", ".gpu/qwen3-dummy")))
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
engine.call(lambda: prof.__enter__())
stats = engine_requests(engine, requests, "idle")
engine.call(lambda: (torch.cuda.synchronize(), prof.__exit__(None, None, None)))
engine.shutdown()
path = os.path.join(tempfile.mkdtemp(), "t.json"); prof.export_chrome_trace(path)
ev = json.load(open(path))["traceEvents"]
kern = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
t0 = kern[0]["ts"]; end = kern[0]["ts"] + kern[0]["dur"]; gaps = []
for e in kern[1:]:
    if e["ts"] > end: gaps.append((e["ts"] - end, end - t0))
    end = max(end, e["ts"] + e["dur"])
span = end - t0; idle = sum(g for g, _ in gaps)
print(f"{W}: {stats.output_tok_s:,.0f} tok/s (CUDA activity profiled); GPU span {span/1e6:.3f} s, idle {idle/1e6:.3f} s ({100*idle/span:.1f}%) in {len(gaps)} gaps")
parts = 8
for p in range(parts):
    lo, hi = span * p / parts, span * (p + 1) / parts
    g = [x for x, at in gaps if lo <= at < hi]
    print(f"  part {p+1}/{parts}: idle {sum(g)/1000:7.1f} ms of {(hi-lo)/1000:7.1f} ({100*sum(g)/(hi-lo):4.1f}%), gaps >100us: {sum(1 for x in g if x > 100)} totalling {sum(x for x in g if x > 100)/1000:.1f} ms")
for lo, hi in ((0, 5), (5, 20), (20, 100), (100, 1000), (1000, 1e9)):
    g = [x for x, _ in gaps if lo <= x < hi]
    print(f"  gaps {lo:>5}-{hi:<5.0f} us: {len(g):7d}, {sum(g)/1000:8.1f} ms")
