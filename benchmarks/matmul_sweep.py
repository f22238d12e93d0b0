"""Launch shapes of the small-batch matmul kernels against cuBLAS, timed as the model runs them.

    python3 -m benchmarks.matmul_sweep                 # Qwen3-0.6B's four matmuls, bf16
    python3 -m benchmarks.matmul_sweep --rows 1 2 4 8 --top 3

For every decoder matmul and row count: the GEMV kernel (`kernels/triton/gemv.py`) over a
grid of column blocks, K chunks and warps, and for o_proj and down_proj the split-K kernel
(`kernels/triton/split_k.py`) over its tile shapes and slice counts, each followed by the
residual add + RMSNorm that reads its output (as in the model), against cuBLAS. Times are
the start-up choices' own (`kernels/triton/timing.py`): CUDA-graph replays cycling through
up to 128 MiB of weight copies, so the weights stream from memory and no Python launch is
timed. The bandwidth column counts the weight bytes only.
The table says which candidates are worth the start-up's time (gemv.CANDIDATES,
split_k.CANDIDATES) and from how many rows cuBLAS wins.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.sglang.kernels.triton import gemv as gemv_module  # noqa: E402
from backend.sglang.kernels.triton import split_k  # noqa: E402
from backend.sglang.kernels.triton.gemv import GemvConfig, gemv  # noqa: E402
from backend.sglang.kernels.triton.norm import fused_add_rms_norm  # noqa: E402
from backend.sglang.kernels.triton.split_k import SplitConfig, split_k_linear  # noqa: E402
from backend.sglang.kernels.triton.timing import streamed_timings  # noqa: E402

Run = Callable[[torch.Tensor], object]
GEMV_SWEEP_ROWS = 8  # the GEMV is swept up to here (the engine uses it up to GEMV_MAX_ROWS)


def gemv_configs() -> list[GemvConfig]:
    shapes = ((512, 4), (1024, 4), (1024, 8))
    return [GemvConfig(n, k, warps) for n in (1, 2, 4, 8) for k, warps in shapes]


def split_configs(rows: int) -> list[SplitConfig]:
    """A grid of tile shapes and slice counts (64-row tiles past 16 rows), plus the
    engine's own candidates."""
    block_m = 16 if rows <= 16 else 64
    grid = [SplitConfig(block_m, n, k, splits, 4) for n, k, splits in
            itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8))]
    return list(dict.fromkeys([*split_k.CANDIDATES, *grid]))


def matmul_runs(x: torch.Tensor, out_features: int, into_norm: bool) -> dict[str, Run]:
    """cuBLAS and every launch shape for one matmul at x's rows; with `into_norm` each is
    followed by the residual add + RMSNorm (what o_proj and down_proj feed)."""
    rows = x.shape[0]
    residual = torch.randn((rows, out_features), dtype=x.dtype, device=x.device)
    norm_weight = torch.ones(out_features, dtype=x.dtype, device=x.device)

    def wrap(call: Callable[[torch.Tensor], object]) -> Run:
        if not into_norm:
            return call
        return lambda w: fused_add_rms_norm(call(w), residual, norm_weight,  # type: ignore[arg-type]
                                            1e-6)

    runs: dict[str, Run] = {"cuBLAS": wrap(partial(F.linear, x))}
    if rows <= GEMV_SWEEP_ROWS:
        for config in gemv_configs():
            runs[f"gemv n{config.block_n} k{config.block_k} w{config.num_warps}"] = wrap(
                partial(gemv, x, bias=None, config=config))
    if into_norm:
        for split in split_configs(rows):
            runs[f"split-K m{split.block_m} n{split.block_n} k{split.block_k} "
                 f"s{split.splits}"] = wrap(
                partial(split_k_linear, x, config=split))
    return runs


def launchable(runs: dict[str, Run], weight: torch.Tensor) -> dict[str, Run]:
    """The runs that compile and run on this card (each once, eagerly)."""
    usable = {}
    for label, run in runs.items():
        try:
            run(weight)
        except Exception as exc:  # noqa: BLE001 - an unlaunchable shape is a result too
            print(f"  {label}: {type(exc).__name__}")
            continue
        usable[label] = run
    return usable


def sweep(name: str, out_features: int, in_features: int, rows: int, into_norm: bool,
          dtype: torch.dtype, top: int) -> list[str]:
    device = torch.device("cuda")
    weight = torch.randn((out_features, in_features), dtype=dtype, device=device) * 0.05
    x = torch.randn((rows, in_features), dtype=dtype, device=device)
    gemv_module.GEMV_MAX_ROWS = max(gemv_module.GEMV_MAX_ROWS, GEMV_SWEEP_ROWS)
    timings = streamed_timings(weight, launchable(matmul_runs(x, out_features, into_norm),
                                                  weight))
    mbytes = weight.nbytes / 1e6
    cublas = timings["cuBLAS"]
    lines = [f"{name:8s} {rows:3d} rows  {'cuBLAS':32s} {cublas * 1e3:6.2f} us "
             f"{mbytes / cublas / 1e3:5.2f} TB/s of weights"]
    for label, ms in sorted(timings.items(), key=lambda item: item[1])[:top]:
        lines.append(f"{'':18s}{label:32s} {ms * 1e3:6.2f} us {mbytes / ms / 1e3:5.2f} TB/s "
                     f"{cublas / ms:5.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--q-width", type=int, default=2048, help="query heads x head dim")
    parser.add_argument("--kv-width", type=int, default=1024, help="KV heads x head dim")
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--top", type=int, default=4)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = {"qkv": (args.q_width + 2 * args.kv_width, args.hidden, False),
              "o": (args.hidden, args.q_width, True),
              "gate_up": (2 * args.intermediate, args.hidden, False),
              "down": (args.hidden, args.intermediate, True)}
    print(torch.cuda.get_device_name(), args.dtype)
    table: list[str] = []
    for rows in args.rows:
        for name, (out_features, in_features, into_norm) in shapes.items():
            if rows > GEMV_SWEEP_ROWS and not into_norm:
                continue  # cuBLAS alone
            lines = sweep(name, out_features, in_features, rows, into_norm, dtype, args.top)
            print("\n".join(lines), flush=True)
            table += lines
    print("\n=== small-batch matmuls (o and down: with the norm after them) ===")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
