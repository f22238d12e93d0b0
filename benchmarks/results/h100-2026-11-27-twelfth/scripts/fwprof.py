"""cProfile of the mixed (eager) steps' forward launch in the shared_prefix workload."""
import cProfile, io, os, pstats, sys, time
sys.path.insert(0, os.getcwd())
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import workload_requests, parse_args
from config import load_config
from engine.engine import Engine
args = parse_args(["--workload", os.environ.get("WORKLOAD", "shared_prefix"), "--num-prompts", os.environ.get("TRACE_N", "1024" if os.environ.get("WORKLOAD", "shared_prefix") == "shared_prefix" else "256"), "--max-output", os.environ.get("TRACE_OUT", "1024")])
env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.environ.get("TRACE_MODEL", ".gpu/qwen3-dummy"))
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
import glob
cache_dir = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
def kernels(): return set(glob.glob(os.path.join(cache_dir, "*", "*.json")))
before = kernels()
prof = cProfile.Profile()
sched = cProfile.Profile()
inner = engine._forward
inner_s = engine.scheduler.schedule
times = []
def fwd(plan):
    if plan.batch is not None and not plan.batch.is_decode:
        t = time.perf_counter(); prof.enable()
        try: return inner(plan)
        finally: prof.disable(); times.append(time.perf_counter() - t)
    return inner(plan)
def schedule():
    sched.enable()
    try: return inner_s()
    finally: sched.disable()
engine._forward = fwd
engine.scheduler.schedule = schedule
stats = engine_requests(engine, requests, "fwprof")
engine.shutdown()
new = sorted(os.path.basename(k) for k in kernels() - before if "__grp__" not in k)
print("\nKERNELS compiled after warm-up:", new)
print(f"{stats.output_tok_s:,.0f} tok/s; mixed forwards {len(times)}, host {sum(times)*1000/max(1,len(times)):.1f} ms each (profiled)")
for name, p in (("forward (mixed)", prof), ("schedule (all)", sched)):
    s = io.StringIO(); pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(int(os.environ.get("TOP", "22"))); print(name); print(s.getvalue()[-5000:])
