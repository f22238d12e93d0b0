"""Host time inside the forward launch of mixed steps (unprofiled perf_counter wrappers):
buffer load, piece replays, per-layer attention (extend kernel, one-token kernel, torch ops),
LM head; over a whole workload run."""
import os, sys, time
from collections import defaultdict
sys.path.insert(0, os.getcwd())
import torch
from benchmarks.measure import engine_requests
from benchmarks.step_timeline import workload_requests, parse_args
from config import load_config
from engine.engine import Engine
import backend.sglang.kernels.triton_ops as T
import backend.sglang.kernels.triton.decode_attention as DA
from backend.sglang import piecewise_graph as PG
W = os.environ.get("WORKLOAD", "offline")
args = parse_args(["--workload", W, "--num-prompts", "1024" if W == "shared_prefix" else "256"])
env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.path.abspath(os.environ.get("MODEL", ".gpu/qwen3-dummy")))
engine = Engine(load_config(env))
requests = workload_requests(args, engine.info.vocab_size)
engine.warmup()
acc = defaultdict(float); cnt = defaultdict(int); on = {"v": False}
def wrap(obj, name):
    f = getattr(obj, name)
    def g(*a, **k):
        if not on["v"]:
            return f(*a, **k)
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            acc[name] += time.perf_counter() - t; cnt[name] += 1
    object.__setattr__(obj, name, g) if not isinstance(obj, type(T)) else setattr(obj, name, g)
pw = engine.runner.piecewise
run = pw.run
def run_w(batch):
    on["v"] = True; t = time.perf_counter()
    try:
        return run(batch)
    finally:
        acc["piecewise.run"] += time.perf_counter() - t; cnt["piecewise.run"] += 1; on["v"] = False
pw.run = run_w
for n in ("_run_piece",): wrap(pw, n)
wrap(pw.buffers, "load")
wrap(pw.model, "head")
for n in ("paged_attention", "extend_attention", "_one_token_attention", "_check_shapes", "decode_attention"): wrap(T, n)
for n in ("decode_slices", "merge_splits", "split_buffers"): wrap(DA, n)
wrap(torch.Tensor, "index_select") if False else None
stats = engine_requests(engine, requests, "mixhost")
engine.shutdown()
n = cnt["piecewise.run"]
print(f"{W}: {stats.output_tok_s:,.0f} tok/s; {n} piecewise steps")
for k in sorted(acc, key=lambda k: -acc[k]):
    print(f"  {k:22s} {cnt[k]:7d} calls  {acc[k]*1e3/max(n,1):8.2f} ms/step  {acc[k]*1e6/cnt[k]:8.1f} us/call")
