"""Replay time of the captured decode graphs: PDL-captured (as the engine captures buckets
<= 64) against the same bucket recaptured with plain launches, alternating rounds."""
import os
import statistics

import torch

import backend.sglang.cuda_graph as cg
from backend.sglang.kernels.triton.common import dependent_launches
from config import load_config
from engine.engine import Engine

env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=os.environ["M"],
           CUDA_GRAPH_MAX_BS="64", PIECEWISE_CUDA_GRAPH="off")
engine = Engine(load_config(env))
runner = engine.runner
g = runner.cuda_graphs
L = int(os.environ.get("CTX", "512"))


def setup(b: int) -> None:
    inp = g.inputs
    inp.kv_indptr[: b + 1].copy_(torch.arange(b + 1, device="cuda") * L)
    inp.kv_indices[: b * L].copy_(torch.arange(b * L, device="cuda") + 1)
    inp.positions[:b].fill_(L - 1)
    inp.out_slots[:b].copy_(torch.arange(b, device="cuda") * L + L)


def time_graph(graph: torch.cuda.CUDAGraph, n: int = 200) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    s.record()
    for _ in range(n):
        graph.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def run() -> None:
    pool = torch.cuda.graph_pool_handle()
    for b in (1, 4, 16, 64):
        pdl = g.graphs[b]
        with torch.inference_mode():
            with dependent_launches(False):
                cg.DEPENDENT_LAUNCH_MAX_BS = 0
                plain = g._capture_bucket(b, pool, cascade=False)
                cg.DEPENDENT_LAUNCH_MAX_BS = 64
        setup(b)
        a, c = [], []
        for _ in range(5):
            a.append(time_graph(pdl))
            c.append(time_graph(plain))
        print(f"bucket {b:3d} ctx {L}: PDL graph {statistics.median(a)*1000:7.1f} us  "
              f"plain graph {statistics.median(c)*1000:7.1f} us  "
              f"ratio {statistics.median(a)/statistics.median(c):.3f}", flush=True)


engine.call(run)
engine.shutdown()
