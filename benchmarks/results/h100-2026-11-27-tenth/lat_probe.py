"""Batch-1 decode ms per step (128-token prompt, 256 new tokens) and how many steps replayed a graph."""
import os
import sys

from benchmarks.measure import engine_requests
from benchmarks.workloads import random_requests
from config import load_config
from engine.engine import Engine

env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.environ["M"])
engine = Engine(load_config(env))
engine.warmup()
g = engine.runner.cuda_graphs
reqs = random_requests(1, input_range=(128, 128), output_range=(256, 256), vocab_size=engine.info.vocab_size)
out = []
for _ in range(3):
    before = g.num_replays if g else 0
    stats = engine_requests(engine, reqs, "lat")
    out.append(f"{stats.decode_s / stats.decode_tokens * 1000:.3f}")
    replays = (g.num_replays if g else 0) - before
print(f"{sys.argv[1]} ms/step {' '.join(out)}  graph replays {replays} of {reqs[0].max_new_tokens} tokens", flush=True)
engine.shutdown()
