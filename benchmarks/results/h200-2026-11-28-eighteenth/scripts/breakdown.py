"""Kernel-time breakdown of the offline workload: all 256 requests against the rr half."""
import os, sys, time
from collections import defaultdict
import torch
CUDA = torch.cuda.is_available()
def sync():
    if CUDA: torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
from benchmarks.measure import engine_requests
from benchmarks.workloads import random_requests
from benchmarks.step_timeline import StepRecorder
from config import load_config
from engine.engine import Engine

CATS = [("attn_decode", ("_decode_split", "_merge_splits")), ("attn_extend", ("_extend_kernel",)),
        ("gemv/splitk", ("_gemv_kernel", "_split_k_kernel")),
        ("cublas", ("gemm", "nvjet", "sm90", "cutlass", "xmma", "ampere")),
        ("norm", ("_rms_norm",)), ("qkv_prepare", ("_qkv_prepare",)), ("silu", ("_silu",)),
        ("copy", ("copy", "Copy", "memcpy", "Memcpy", "fill", "index")),]

def cat(name):
    for c, keys in CATS:
        if any(k in name for k in keys):
            return c
    return "other"

def run(engine, reqs, label, prof_on):
    engine.flush_cache()
    rec = engine.call(lambda: StepRecorder(engine))
    if prof_on:
        with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as p:
            st = engine_requests(engine, reqs, label)
            sync()
    else:
        st = engine_requests(engine, reqs, label); p = None
    sync()
    steps = engine.call(lambda: list(rec.steps))
    engine._forward = rec.inner
    sys.stderr.flush(); print(f"\n== {label}: {len(reqs)} req, {st.output_tokens} tok, {st.wall_s:.3f} s, {st.output_tok_s:,.0f} tok/s, {len(steps)} steps")
    buckets = defaultdict(lambda: [0, 0.0])
    pre = [0, 0.0]
    for s in steps:
        d = s.events[0].elapsed_time(s.events[1]) if s.events else 0.0
        if s.decode:
            b = s.batch_size; k = 1
            while k < b: k *= 2
            buckets[k][0] += 1; buckets[k][1] += d
        else:
            pre[0] += 1; pre[1] += d
    print(f"  prefill/mixed steps {pre[0]} device {pre[1]/1000:.3f} s")
    for k in sorted(buckets):
        n, d = buckets[k]
        print(f"  decode batch<= {k:4d}: steps {n:5d} device {d/1000:.3f} s avg {d/n:.3f} ms")
    if p is None:
        return
    tot = defaultdict(float); cnt = defaultdict(int)
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t:
            c = cat(e.key); tot[c] += t; cnt[c] += e.count
    names = defaultdict(float)
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and cat(e.key) in ("other", "cublas", "copy"):
            names[e.key[:90]] += t
    all_t = sum(tot.values())
    for c in sorted(tot, key=lambda c: -tot[c]):
        print(f"  {c:12s} {tot[c]/1e6:7.3f} s  {cnt[c]:8d} kernels  {100*tot[c]/all_t:5.1f}%")
    print(f"  total kernel time {all_t/1e6:.3f} s")
    for k, t in sorted(names.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {t/1e6:7.3f} s  {k}")

def main():
    env = dict(os.environ, LOAD_FORMAT="dummy", MODEL_LOCAL_DIR=sys.argv[1])
    engine = Engine(load_config(env))
    try:
        N = int(os.environ.get('BD_N', 256)); L = int(os.environ.get('BD_L', 1024))
        reqs = random_requests(N, input_range=(min(100, L), L), output_range=(min(100, L), L),
                               vocab_size=engine.info.vocab_size)
        engine.warmup()
        run(engine, reqs, "warm full", False)
        half = reqs[0::2]
        run(engine, half, "half (rr share)", False)
        run(engine, reqs, "full", False)
        if os.environ.get("BD_PROFILE", "0") == "1":
            run(engine, half, "half profiled", True)
            run(engine, reqs, "full profiled", True)
        else:
            run(engine, half, "half again", False)
    finally:
        engine.shutdown()

main()
