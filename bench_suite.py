"""Benchmarks of mini-sglang beside the plain transformers baseline, on this machine, in one run.

    python3 bench_suite.py cpu            # SmolLM2-135M: one stream, then 16 concurrent streams
    python3 bench_suite.py offline        # 256 random requests, lengths in [100, 1024]
    python3 bench_suite.py latency        # batch 1, 128-token prompt: ms per decode step
    python3 bench_suite.py shared_prefix  # groups sharing a system prompt: radix cache on / off
    python3 bench_suite.py online         # the offline requests through the HTTP server

Each run prints a small table and one `SUMMARY <workload>:` line, and writes
`<results-dir>/<workload>-<timestamp>.json` and a PNG plot beside it. The model comes from the
usual flags (or `--model`); on CUDA, every workload but `cpu` defaults to Qwen3-0.6B's
architecture with random weights (model_configs/qwen3-0.6b, LOAD_FORMAT=dummy). Every size
can be scaled down (`--num-prompts`, `--max-input`, `--max-output`, `--skip-baseline`, ...)
so that a run takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.loader import ModelLoadError, resolve_model
from benchmarks.context import BenchContext, baseline_subset, dtype_name, with_baseline, with_engine
from benchmarks.measure import (
    BenchError,
    RunStats,
    engine_requests,
    engine_run,
    greedy,
    hf_batches,
    hf_single,
)
from benchmarks.online import http_run, running_server, server_available
from benchmarks.report import BenchResult, PlotPanel, fmt, ratio, write_result
from benchmarks.workloads import (
    BenchRequest,
    chat_prompts,
    fixed_requests,
    random_requests,
    shared_prefix_requests,
)
from config import Config, ConfigError, load_config, replace
from engine.sampling_params import InvalidRequestError
from multi_device import AnyEngine

logger = logging.getLogger("bench_suite")

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_GPU_MODEL = REPO_ROOT / "model_configs" / "qwen3-0.6b"
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CPU_GOAL_SINGLE_TOK_S = 100.0
CPU_GOAL_MULTI_TOK_S = 400.0
CPU_GOAL_STREAMS = 16  # the many-stream goal is for this many streams
OURS = "mini-sglang"
HF = "HF baseline"

def versus(ours: float, theirs: float | None, unit: str = "tok/s") -> str:
    """'vs HF 12.3 tok/s (4.56x)', or '' without a baseline."""
    if theirs is None or math.isnan(theirs):
        return ""
    return f" vs HF {fmt(theirs)} {unit} ({fmt(ratio(ours, theirs), 2)}x)"


def goal_text(value: float, goal: float) -> str:
    if math.isnan(goal):
        return "no goal for this setting"
    return f"goal >= {goal:.0f}: {'met' if value >= goal else 'missed'}"


# ---------------------------------------------------------------- workloads
def bench_cpu(ctx: BenchContext) -> BenchResult:
    """One greedy stream and N concurrent streams of chat prompts, EOS ignored."""
    args = ctx.args
    streams = args.num_prompts or CPU_GOAL_STREAMS
    new_tokens = args.max_output or 128
    conversations = chat_prompts(streams)
    multi_goal = CPU_GOAL_MULTI_TOK_S if streams == CPU_GOAL_STREAMS else math.nan

    def run(engine: AnyEngine) -> tuple[list[list[int]], RunStats, RunStats]:
        ids = [engine.tokenize(c)[: args.max_input or None] for c in conversations]
        single = engine_run(engine, [ids[0]], [greedy(new_tokens)], "engine: 1 stream")
        engine.flush_cache()
        multi = engine_run(engine, ids, [greedy(new_tokens)] * streams,
                           f"engine: {streams} streams")
        return ids, single, multi

    ids, single, multi = with_engine(ctx, run)
    requests = [BenchRequest(p, new_tokens) for p in ids]
    hf_dtype = ctx.baseline_dtype(torch.float32)
    hf = with_baseline(ctx, hf_dtype, lambda b: (
        hf_single(b, ids[0], new_tokens, "HF: 1 stream"),
        hf_batches(b, requests, streams, f"HF: {streams} streams"),
    ))
    hf_single_tok_s = hf[0].decode_tok_s if hf else math.nan
    hf_multi_tok_s = hf[1].output_tok_s if hf else math.nan
    hf_label = f"{HF} ({dtype_name(hf_dtype)})"
    rows = [
        ["1 stream, decode tok/s", single.decode_tok_s, hf_single_tok_s,
         ratio(single.decode_tok_s, hf_single_tok_s), CPU_GOAL_SINGLE_TOK_S],
        [f"{streams} streams, output tok/s", multi.output_tok_s, hf_multi_tok_s,
         ratio(multi.output_tok_s, hf_multi_tok_s), multi_goal],
    ]
    summary = (
        f"1 stream {fmt(single.decode_tok_s)} tok/s "
        f"({goal_text(single.decode_tok_s, CPU_GOAL_SINGLE_TOK_S)})"
        f"{versus(single.decode_tok_s, hf_single_tok_s)}"
        f" | {streams} streams {fmt(multi.output_tok_s)} tok/s "
        f"({goal_text(multi.output_tok_s, multi_goal)})"
        f"{versus(multi.output_tok_s, hf_multi_tok_s)}"
        f" | HF dtype {dtype_name(hf_dtype)}"
    )
    return BenchResult(
        workload="cpu",
        summary=summary,
        metrics={
            "engine": {"single": single.summary(), "multi": multi.summary()},
            "baseline": {"dtype": dtype_name(hf_dtype), "single": hf[0].summary(),
                         "multi": hf[1].summary()} if hf else None,
            "goals": {"single_tok_s": CPU_GOAL_SINGLE_TOK_S,
                      "multi_tok_s": None if math.isnan(multi_goal) else multi_goal},
            "new_tokens": new_tokens,
            "streams": streams,
        },
        table_headers=["setting", OURS, hf_label, "speedup", "goal"],
        table_rows=rows,
        panels=[PlotPanel(f"{ctx.source.name} on {ctx.device.type}", "tok/s", {
            OURS: {"1 stream": single.decode_tok_s, f"{streams} streams": multi.output_tok_s},
            hf_label: {"1 stream": hf_single_tok_s, f"{streams} streams": hf_multi_tok_s},
            "goal": {"1 stream": CPU_GOAL_SINGLE_TOK_S, f"{streams} streams": multi_goal},
        })],
    )


def offline_requests(ctx: BenchContext, seed_offset: int = 0) -> list[BenchRequest]:
    args = ctx.args
    max_in = args.max_input or 1024
    max_out = args.max_output or 1024
    return random_requests(
        args.num_prompts or 256,
        input_range=(min(args.min_input, max_in), max_in),
        output_range=(min(args.min_output, max_out), max_out),
        vocab_size=ctx.vocab_size,
        seed=args.seed + seed_offset,
    )


def hf_throughput(ctx: BenchContext, requests: list[BenchRequest]) -> RunStats | None:
    subset = baseline_subset(ctx, requests)
    return with_baseline(ctx, ctx.baseline_dtype(ctx.dtype), lambda b: hf_batches(
        b, subset, ctx.args.baseline_batch_size, f"HF: {len(subset)} requests"))


def throughput_row(name: str, stats: RunStats | None) -> list[Any]:
    if stats is None:
        return [name, None, None, None, None]
    return [name, stats.num_requests, stats.output_tokens, stats.wall_s, stats.output_tok_s]


def bench_offline(ctx: BenchContext) -> BenchResult:
    """Every request at once; output tokens per second."""
    requests = offline_requests(ctx)
    ours = with_engine(ctx, lambda e: engine_requests(e, requests, "engine: offline"))
    hf = hf_throughput(ctx, requests)
    hf_tok_s = hf.output_tok_s if hf else None
    summary = (
        f"{fmt(ours.output_tok_s)} output tok/s ({ours.num_requests} requests, "
        f"{ours.output_tokens:,} tokens in {ours.wall_s:.1f} s)"
        f"{versus(ours.output_tok_s, hf_tok_s)}"
    )
    return BenchResult(
        workload="offline",
        summary=summary,
        metrics={"engine": ours.summary(), "baseline": hf.summary() if hf else None},
        table_headers=["system", "requests", "output tokens", "seconds", "output tok/s"],
        table_rows=[throughput_row(OURS, ours), throughput_row(HF, hf)],
        panels=[PlotPanel("offline throughput", "output tok/s", {
            OURS: {"offline": ours.output_tok_s}, HF: {"offline": hf_tok_s or math.nan}})],
    )


def bench_latency(ctx: BenchContext) -> BenchResult:
    """Batch 1: milliseconds per decode step (median and p90 of token intervals)."""
    args = ctx.args
    new_tokens = args.max_output or 256
    request = fixed_requests(1, input_len=args.max_input or 128, output_len=new_tokens,
                             vocab_size=ctx.vocab_size, seed=args.seed)[0]
    ours = with_engine(ctx, lambda e: engine_requests(e, [request], "engine: batch 1"))
    hf = with_baseline(ctx, ctx.baseline_dtype(ctx.dtype), lambda b: hf_single(
        b, request.prompt_ids, new_tokens, "HF: batch 1"))
    ours_mean = 1000 / ours.decode_tok_s
    hf_mean = 1000 / hf.decode_tok_s if hf else math.nan
    rows: list[list[Any]] = [
        [OURS, ours.itl_ms(50), ours.itl_ms(90), ours_mean, ours.ttft_ms(50)],
        [HF, None, None, hf_mean, hf.ttft_ms(50) if hf else None],
    ]
    summary = (
        f"{ours.itl_ms(50):.2f} ms/step median, {ours.itl_ms(90):.2f} ms p90, "
        f"{ours_mean:.2f} ms mean (TTFT {ours.ttft_ms(50):.1f} ms, {request.input_len}-token "
        f"prompt, {new_tokens} new tokens)"
        + (f" vs HF {hf_mean:.2f} ms/step mean (speedup {ratio(hf_mean, ours_mean):.2f}x)"
           if hf else "")
    )
    return BenchResult(
        workload="latency",
        summary=summary,
        metrics={
            "engine": {**ours.summary(), "step_p50_ms": ours.itl_ms(50),
                       "step_p90_ms": ours.itl_ms(90), "step_mean_ms": ours_mean},
            "baseline": {**hf.summary(), "step_mean_ms": hf_mean} if hf else None,
        },
        table_headers=["system", "p50 ms/step", "p90 ms/step", "mean ms/step", "TTFT ms"],
        table_rows=rows,
        panels=[PlotPanel("decode step, batch 1", "ms", {
            OURS: {"p50": ours.itl_ms(50), "p90": ours.itl_ms(90), "mean": ours_mean},
            HF: {"mean": hf_mean}})],
    )


def bench_shared_prefix(ctx: BenchContext) -> BenchResult:
    """Groups sharing a long system prompt, with the radix cache on and then off."""
    args = ctx.args
    per_group = args.prompts_per_group
    groups = math.ceil(args.num_prompts / per_group) if args.num_prompts else args.groups
    requests = shared_prefix_requests(
        num_groups=groups,
        prompts_per_group=per_group,
        system_len=args.system_len,
        question_len=args.question_len,
        output_len=args.max_output or 256,
        vocab_size=ctx.vocab_size,
        seed=args.seed,
    )[: args.num_prompts or None]
    runs: dict[str, RunStats] = {}
    for label, enabled in (("cache on", True), ("cache off", False)):
        run = functools.partial(engine_requests, requests=requests, desc=f"engine: {label}")
        runs[label] = with_engine(ctx, run, replace(ctx.config, prefix_cache=enabled))
    on, off = runs["cache on"], runs["cache off"]
    hf = hf_throughput(ctx, requests)
    hit = on.cached_tokens / on.input_tokens if on.input_tokens else 0.0
    summary = (
        f"radix cache on {fmt(on.output_tok_s)} tok/s, off {fmt(off.output_tok_s)} tok/s "
        f"({fmt(ratio(on.output_tok_s, off.output_tok_s), 2)}x; {hit:.0%} of prompt tokens "
        f"cached; {groups}x{per_group} prompts, {args.system_len}+{args.question_len} tokens)"
        f"{versus(on.output_tok_s, hf.output_tok_s if hf else None)}"
    )
    rows = [throughput_row(f"{OURS}, {k}", v) + [v.cached_tokens] for k, v in runs.items()]
    rows.append(throughput_row(HF, hf) + [0 if hf else None])
    return BenchResult(
        workload="shared_prefix",
        summary=summary,
        metrics={
            "engine_cache_on": on.summary(),
            "engine_cache_off": off.summary(),
            "speedup_cache_on_vs_off": ratio(on.output_tok_s, off.output_tok_s),
            "cached_fraction": hit,
            "baseline": hf.summary() if hf else None,
        },
        table_headers=["system", "requests", "output tokens", "seconds", "output tok/s",
                       "cached tokens"],
        table_rows=rows,
        panels=[PlotPanel("shared prefix throughput", "output tok/s", {
            f"{OURS}, {k}": {"throughput": v.output_tok_s} for k, v in runs.items()
        } | {HF: {"throughput": hf.output_tok_s if hf else math.nan}})],
    )


def bench_online(ctx: BenchContext) -> BenchResult:
    """The offline requests through HTTP (all at once, then at a fixed rate), beside offline."""
    if not server_available():
        raise BenchError("the online workload needs the HTTP server, api/server.py, which is "
                         "not in this tree yet")
    args = ctx.args
    requests = offline_requests(ctx)
    rate = args.request_rate
    runs: dict[str, RunStats] = {}
    with running_server(ctx.config) as url:
        runs["HTTP, all at once"] = http_run(url, requests, math.inf, "HTTP: all at once",
                                             args.api_key, args.seed)
        # fresh prompts of the same lengths: the first run's prompts sit in the radix cache
        fresh = offline_requests(ctx, seed_offset=1)
        runs[f"HTTP, {rate:g} req/s"] = http_run(url, fresh, rate, f"HTTP: {rate:g} req/s",
                                                 args.api_key, args.seed)
    runs["in-process, offline"] = with_engine(
        ctx, lambda e: engine_requests(e, requests, "engine: offline"))
    hf = hf_throughput(ctx, requests)
    burst, paced, offline = runs.values()
    rows: list[list[Any]] = [[name, s.output_tok_s, s.ttft_ms(50), s.ttft_ms(90), s.ttft_ms(99),
             s.itl_ms(50), s.itl_ms(90), s.itl_ms(99)] for name, s in runs.items()]
    if hf:
        rows.append([HF, hf.output_tok_s] + [None] * 6)
    summary = (
        f"{fmt(burst.output_tok_s)} tok/s all at once (TTFT p50 {fmt(burst.ttft_ms(50))} ms, "
        f"ITL p50 {fmt(burst.itl_ms(50), 2)} ms) | {fmt(paced.output_tok_s)} tok/s at {rate:g} "
        f"req/s (TTFT p50 {fmt(paced.ttft_ms(50))} ms, ITL p50 {fmt(paced.itl_ms(50), 2)} ms) "
        f"| in-process {fmt(offline.output_tok_s)} tok/s"
        f"{versus(burst.output_tok_s, hf.output_tok_s if hf else None)}"
    )
    return BenchResult(
        workload="online",
        summary=summary,
        metrics={**{name: s.summary() for name, s in runs.items()},
                 "request_rate": rate, "baseline": hf.summary() if hf else None},
        table_headers=["mode", "output tok/s", "TTFT p50 ms", "p90", "p99",
                       "ITL p50 ms", "p90", "p99"],
        table_rows=rows,
        panels=[
            PlotPanel("throughput", "output tok/s", {
                name: {"throughput": s.output_tok_s} for name, s in runs.items()
            } | {HF: {"throughput": hf.output_tok_s if hf else math.nan}}),
            PlotPanel("time to first token", "ms", {
                name: {f"p{q}": s.ttft_ms(q) for q in (50, 90, 99)} for name, s in runs.items()
            }),
            PlotPanel("inter-token latency", "ms", {
                name: {f"p{q}": s.itl_ms(q) for q in (50, 90, 99)} for name, s in runs.items()
            }),
        ],
    )


def bench_image(args: argparse.Namespace) -> BenchResult:
    """Text-to-image: seconds per image and images per minute at n=1 and n=4, our generation
    path beside a plain diffusers pipeline call on the same pipeline in the same run."""
    from backend.diffusion.images import (
        ImageRequest,
        build_dummy_pipeline,
        generate_images,
        is_z_image,
        load_pipeline,
    )
    from config import resolve_device

    if not args.model:
        raise BenchError("image: pass --model, a diffusers pipeline folder (or hub id)")
    device = resolve_device(args.device or "auto")
    dtype = getattr(torch, args.dtype) if args.dtype and args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipeline = (build_dummy_pipeline(args.model, device, dtype) if args.load_format == "dummy"
                else load_pipeline(args.model, device, dtype))
    size = args.image_size
    steps = args.image_steps or (9 if is_z_image(pipeline) else 20)
    guidance = 0.0 if is_z_image(pipeline) else None

    def ours(n: int) -> None:
        generate_images(pipeline, ImageRequest(prompt="a lighthouse at dawn", n=n, width=size,
                                               height=size, steps=steps, guidance_scale=guidance,
                                               seed=0), device)

    def plain(n: int) -> None:
        extra = {} if guidance is None else {"guidance_scale": guidance}
        pipeline(prompt="a lighthouse at dawn", height=size, width=size, num_images_per_prompt=n,
                 num_inference_steps=steps, generator=torch.Generator(device).manual_seed(0),
                 **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    pipeline.set_progress_bar_config(disable=True)
    ours(1)  # warm-up (kernels, allocator)
    rows, metrics = [], {}
    for n in (1, 4):
        timed = {}
        for name, run in ((OURS, ours), ("diffusers", plain)):
            start = time.perf_counter()
            for _ in range(args.repeats):
                run(n)
            timed[name] = (time.perf_counter() - start) / (args.repeats * n)
        metrics[f"n{n}"] = {k: {"s_per_image": v, "images_per_min": 60 / v}
                            for k, v in timed.items()}
        rows.append([f"n={n}", timed[OURS], 60 / timed[OURS], timed["diffusers"],
                     60 / timed["diffusers"]])
    summary = " | ".join(
        f"n={n}: {metrics[f'n{n}'][OURS]['s_per_image']:.2f} s/image "
        f"({metrics[f'n{n}'][OURS]['images_per_min']:.1f}/min) vs diffusers "
        f"{metrics[f'n{n}']['diffusers']['s_per_image']:.2f} s/image" for n in (1, 4))
    return BenchResult(
        workload="image",
        summary=f"{summary} | {size}x{size}, {steps} steps",
        metrics={**metrics, "size": size, "steps": steps},
        table_headers=["batch", "ours s/image", "ours images/min", "diffusers s/image",
                       "diffusers images/min"],
        table_rows=rows,
        panels=[PlotPanel(f"{type(pipeline).__name__} {size}x{size}", "images/min", {
            name: {f"n={n}": metrics[f"n{n}"][name]["images_per_min"] for n in (1, 4)}
            for name in (OURS, "diffusers")})],
        meta={"model": Path(args.model).name, "model_path": args.model,
              "device": device.type, "dtype": str(dtype).removeprefix("torch.")},
    )


WORKLOADS: dict[str, Callable[[BenchContext], BenchResult]] = {
    "cpu": bench_cpu,
    "offline": bench_offline,
    "latency": bench_latency,
    "shared_prefix": bench_shared_prefix,
    "online": bench_online,
}


# ---------------------------------------------------------------- command line
def build_config(args: argparse.Namespace) -> Config:
    """The flags from the environment, then the command line; the GPU default model."""
    overrides: dict[str, Any] = {}
    if args.model:
        if Path(args.model).expanduser().exists():
            overrides["model_local_dir"] = args.model
        else:
            overrides.update(model_name=args.model, model_local_dir="")
    for attr in ("load_format", "dtype", "device", "backend_impl"):
        if getattr(args, attr):
            overrides[attr] = getattr(args, attr)
    config = load_config(**overrides)
    if (args.workload != "cpu" and not config.model_local_dir and not config.model_name
            and config.resolved_device().type == "cuda"):
        if not (DEFAULT_GPU_MODEL / "config.json").is_file():
            raise BenchError(f"{DEFAULT_GPU_MODEL} has no config.json; pass --model")
        config = replace(config, model_local_dir=str(DEFAULT_GPU_MODEL),
                         load_format=args.load_format or "dummy")
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:8]))
    parser.add_argument("workload", choices=sorted([*WORKLOADS, "image"]))
    model = parser.add_argument_group("model (defaults: the usual flags)")
    model.add_argument("--model", help="local folder / .gguf / hub id")
    model.add_argument("--load-format", choices=["auto", "dummy"])
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    model.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    model.add_argument("--backend", dest="backend_impl", choices=["auto", "sgl", "hf", "torch"])
    sizes = parser.add_argument_group("sizes (defaults: each workload's own)")
    sizes.add_argument("--num-prompts", type=int, help="requests (cpu: concurrent streams)")
    sizes.add_argument("--max-input", type=int, help="longest prompt in tokens")
    sizes.add_argument("--max-output", type=int, help="most new tokens per request")
    sizes.add_argument("--min-input", type=int, default=100, help="offline/online: shortest")
    sizes.add_argument("--min-output", type=int, default=100, help="offline/online: fewest")
    sizes.add_argument("--groups", type=int, default=64, help="shared_prefix: groups")
    sizes.add_argument("--prompts-per-group", type=int, default=16, help="shared_prefix")
    sizes.add_argument("--system-len", type=int, default=2048, help="shared_prefix: tokens")
    sizes.add_argument("--question-len", type=int, default=128, help="shared_prefix: tokens")
    sizes.add_argument("--request-rate", type=float, default=8.0, help="online: fixed rate")
    sizes.add_argument("--api-key", default=None, help="online: bearer token for the server")
    sizes.add_argument("--seed", type=int, default=0)
    base = parser.add_argument_group("HF baseline")
    base.add_argument("--skip-baseline", action="store_true")
    base.add_argument("--baseline-dtype", default="auto",
                      choices=["auto", "float32", "bfloat16", "float16"],
                      help="auto: float32 for cpu (HF's default), else the engine's dtype")
    base.add_argument("--baseline-num-prompts", type=int, default=None,
                      help="run the baseline on the first N requests only")
    base.add_argument("--baseline-batch-size", type=int, default=64,
                      help="padded batch size of the baseline's generate")
    image = parser.add_argument_group("image (a diffusers pipeline folder as --model)")
    image.add_argument("--image-size", type=int, default=1024)
    image.add_argument("--image-steps", type=int, default=None,
                       help="default: 9 for Z-Image (8 transformer evaluations), else 20")
    image.add_argument("--repeats", type=int, default=2, help="timed runs per batch size")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    return parser.parse_args(argv)


def report(result: BenchResult, results_dir: Path) -> None:
    print(result.table())
    print(f"SUMMARY {result.workload}: {result.summary} | {result.meta['model']} "
          f"{result.meta['device']} {result.meta['dtype']}")
    files = write_result(result, results_dir)
    print(f"wrote {files.json_path}" + (f" and {files.png_path}" if files.png_path else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "image":
        try:
            report(bench_image(args), args.results_dir)
        except BenchError as exc:
            logger.error("%s", exc)
            return 2
        return 0
    try:
        config = build_config(args)
        logging.basicConfig(level=config.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        ctx = BenchContext(args, config, resolve_model(config))
        logger.info("%s on %s (%s), model %s", args.workload, ctx.device,
                    dtype_name(ctx.dtype), ctx.source.name)
        result = WORKLOADS[args.workload](ctx)
        result.meta = ctx.meta()
        report(result, args.results_dir)
    except (BenchError, ConfigError, ModelLoadError, InvalidRequestError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
