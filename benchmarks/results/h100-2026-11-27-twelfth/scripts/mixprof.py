"""torch.profiler over the first STEPS steps of a workload run (offline: its prefill/mixed
steps and the start of decode): GPU idle gaps and what the host was doing, CUDA API calls."""
import gzip, json, os, sys, time, bisect
from collections import defaultdict
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import workload_requests, parse_args
from config import load_config
from engine.engine import Engine
W = os.environ.get("WORKLOAD", "offline")
args = parse_args(["--workload", W, "--num-prompts", "1024" if W == "shared_prefix" else "256"])
env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=".gpu/qwen3-dummy")
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
FIRST, LAST = int(os.environ.get("FIRST", "0")), int(os.environ.get("STEPS", "60"))
inner = engine._forward
state = {"n": 0, "prof": None, "kinds": []}
def fwd(plan):
    n = state["n"]; state["n"] += 1
    if n == FIRST:
        state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        state["prof"].__enter__()
    if n == LAST and state["prof"] is not None:
        torch.cuda.synchronize(); state["prof"].__exit__(None, None, None)
    if FIRST <= n < LAST:
        b = plan.batch
        state["kinds"].append((n, "decode" if b is not None and b.is_decode else "mixed", b.batch_size if b else 0, b.num_tokens if b else 0))
        with torch.profiler.record_function(f"STEP{n}"):
            return inner(plan)
    return inner(plan)
engine._forward = fwd
def annotate(obj, name):
    f = getattr(obj, name)
    def g(*a, **k):
        with torch.profiler.record_function(name):
            return f(*a, **k)
    setattr(obj, name, g)
for name in ("schedule", "_admit", "_plan", "cache_prompts", "_grow_decoding"):
    annotate(engine.scheduler, name)
for name in ("_read_in_flight",):
    annotate(engine, name)
annotate(engine.sampler, "sample_async")
m0 = torch.cuda.memory_stats()
stats = engine_requests(engine, requests, "mixprof")
m1 = torch.cuda.memory_stats()
engine.shutdown()
print(f"{stats.output_tok_s:,.0f} tok/s (profiled window {FIRST}-{LAST})")
for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms"):
    print(f"  {k}: {m1.get(k, 0) - m0.get(k, 0)}")
path = os.path.join(os.environ.get("OUT", "/tmp"), f"trace-{W}.json")
state["prof"].export_chrome_trace(path)
ev = json.load(open(path))["traceEvents"]
with gzip.open(path + ".gz", "wt") as f: json.dump({"traceEvents": ev}, f)
os.remove(path)
X = [e for e in ev if e.get("ph") == "X"]
kern = sorted((e for e in X if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
rt = [e for e in X if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"]
cpu = sorted((e for e in X if e.get("cat") in ("cpu_op", "user_annotation", "python_function")), key=lambda e: e["ts"])
steps = sorted((e for e in cpu if e["name"].startswith("STEP")), key=lambda e: e["ts"])
print("\nCUDA API calls (count, total ms, max ms):")
agg = defaultdict(lambda: [0, 0.0, 0.0])
for e in rt:
    a = agg[e["name"]]; a[0] += 1; a[1] += e["dur"] / 1000; a[2] = max(a[2], e["dur"] / 1000)
for name, (c, t, mx) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:14]:
    print(f"  {name:40s} {c:7d} {t:9.2f} {mx:8.2f}")
launch_by_corr = {e["args"].get("correlation"): e for e in rt if "correlation" in e.get("args", {})}
starts = [e["ts"] for e in cpu]
def host_ops_at(ts):
    out = []
    for e in cpu:
        if e["ts"] <= ts <= e["ts"] + e["dur"] and e["dur"] > 0: out.append(e["name"][:40])
    return " > ".join(out[-4:])
busy_end = kern[0]["ts"] + kern[0]["dur"]; gaps = []
span0 = kern[0]["ts"]
busy = 0.0
for e in kern[1:]:
    if e["ts"] > busy_end + 20:
        gaps.append((e["ts"] - busy_end, busy_end, e))
    busy_end = max(busy_end, e["ts"] + e["dur"])
span = busy_end - span0
tot = sum(g[0] for g in gaps)
print(f"\nGPU span {span/1000:.1f} ms, idle gaps >20us: {len(gaps)} totalling {tot/1000:.2f} ms")
def step_of(ts):
    i = bisect.bisect_right([s["ts"] for s in steps], ts) - 1
    return steps[i]["name"] if i >= 0 else "-"
kinds = {f"STEP{n}": f"{k} b{b} t{t}" for n, k, b, t in state["kinds"]}
by_step = defaultdict(float)
for g, s, e in gaps:
    launch = launch_by_corr.get(e.get("args", {}).get("correlation"))
    by_step[step_of(launch["ts"] if launch else e["ts"])] += g
print("idle per step (launching step):")
for s, g in sorted(by_step.items(), key=lambda kv: -kv[1])[:25]:
    print(f"  {s:8s} {kinds.get(s, ''):24s} {g/1000:7.2f} ms")
print("largest gaps (ms, next kernel, host ops when it was launched):")
for g, s, e in sorted(gaps, key=lambda x: -x[0])[:25]:
    launch = launch_by_corr.get(e.get("args", {}).get("correlation"))
    lt = launch["ts"] if launch else e["ts"]
    print(f"  {g/1000:6.2f} at {(s-span0)/1000:8.1f} {e['name'][:38]:38s} launched {(lt - s)/1000:+6.2f} ms after gap start; {launch['name'] if launch else '?'} in: {host_ops_at(lt)}")
print("\nslow host ops (> 1 ms, by name: count, total ms, max ms):")
agg = defaultdict(lambda: [0, 0.0, 0.0])
for e in cpu:
    if e["name"].startswith("STEP") or e["cat"] == "python_function": continue
    a = agg[e["name"]]; a[0] += 1; a[1] += e["dur"] / 1000; a[2] = max(a[2], e["dur"] / 1000)
for name, (c, t, mx) in sorted(agg.items(), key=lambda kv: -kv[1][2])[:20]:
    print(f"  {name[:50]:50s} {c:7d} {t:9.2f} {mx:8.2f}")
print("\nsteps (host ms inside _forward):")
for s in steps[:40]:
    print(f"  {s['name']:8s} {kinds.get(s['name'], ''):24s} {s['dur']/1000:7.2f}")
