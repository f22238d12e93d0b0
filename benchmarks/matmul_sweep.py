"""Launch shapes of the small-batch matmul kernels against cuBLAS, timed as the model runs them.

    python3 -m benchmarks.matmul_sweep                 # Qwen3-0.6B's four matmuls, bf16
    python3 -m benchmarks.matmul_sweep --rows 1 2 4 8 --top 3
    python3 -m benchmarks.matmul_sweep --mlp     # the fused MLP kernel against three launches

For every decoder matmul and row count: the GEMV kernel (`kernels/triton/gemv.py`) over a
grid of column blocks, K chunks and warps, and for o_proj and down_proj the split-K kernel
(`kernels/triton/split_k.py`) over its tile shapes and slice counts, each followed by the
residual add + RMSNorm that reads its output (as in the model), against cuBLAS. Times are
the start-up choices' own (`kernels/triton/timing.py`): CUDA-graph replays cycling through
up to 128 MiB of weight copies, so the weights stream from memory and no Python launch is
timed. The bandwidth column counts the weight bytes only.
The table says which candidates are worth the start-up's time (gemv.CANDIDATES,
split_k.CANDIDATES) and from how many rows cuBLAS wins. With --mlp: the whole MLP of a few
rows in one kernel (`kernels/triton/fused_mlp.py`) over its launch shapes, against the
engine's three launches (gate/up, SiLU-and-mul, down as the start-up choices pick them),
both with the norm after them and both weights streaming.
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

from backend.sglang.kernels.torch_ops import SplitSum, dense  # noqa: E402
from backend.sglang.kernels.triton import gemv as gemv_module  # noqa: E402
from backend.sglang.kernels.triton import split_k  # noqa: E402
from backend.sglang.kernels.triton.elementwise import silu_and_mul  # noqa: E402
from backend.sglang.kernels.triton.fused_mlp import (  # noqa: E402
    FUSED_MLP_MAX_ROWS,
    MlpConfig,
    fused_mlp,
)
from backend.sglang.kernels.triton.gemv import GemvConfig, gemv  # noqa: E402
from backend.sglang.kernels.triton.gemv import linear as engine_linear  # noqa: E402
from backend.sglang.kernels.triton.norm import fused_add_rms_norm  # noqa: E402
from backend.sglang.kernels.triton.split_k import (  # noqa: E402
    SplitConfig,
    linear_into_norm,
    split_k_linear,
)
from backend.sglang.kernels.triton.timing import (  # noqa: E402
    graph_ms,
    streamed_timings,
    weight_copies,
)

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


def mlp_configs() -> list[MlpConfig]:
    """Shapes whose two float32 gate/up tiles fit the registers of an sm_90 thread (ptxas:
    32-column blocks with 512-1,024-key chunks spill) and whose down-weight reads are a
    32-byte sector wide or more (16 columns of bf16)."""
    return [MlpConfig(16, 256, 256, 4), MlpConfig(16, 512, 256, 8),
            MlpConfig(16, 1024, 256, 8), MlpConfig(16, 1024, 128, 8),
            MlpConfig(32, 256, 256, 8)]


def _agrees(result: SplitSum, reference: torch.Tensor) -> bool:
    """Within bf16 rounding of the three launches' output (the atomics' order varies)."""
    error = (result.total().float() - reference).abs().max().item()
    return error <= 2e-2 * reference.abs().max().item() + 1e-3


def sweep_mlp(hidden: int, intermediate: int, rows: int, dtype: torch.dtype, top: int
              ) -> list[str]:
    """The fused MLP's launch shapes against the three launches, norm after both."""
    device = torch.device("cuda")
    gate_up = torch.randn((2 * intermediate, hidden), dtype=dtype, device=device) * 0.05
    down = torch.randn((hidden, intermediate), dtype=dtype, device=device) * 0.05
    x = torch.randn((rows, hidden), dtype=dtype, device=device)
    residual = torch.randn((rows, hidden), dtype=dtype, device=device)
    norm_weight = torch.ones(hidden, dtype=dtype, device=device)
    # copies of both weights side by side, so that both stream from memory
    pairs = [(copy, down if j == 0 else down.clone())
             for j, copy in enumerate(weight_copies(gate_up))]

    def three(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        act = silu_and_mul(engine_linear(x, pair[0], None))
        fused_add_rms_norm(linear_into_norm(act, pair[1], None), residual, norm_weight, 1e-6)

    def fused(config: MlpConfig, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        fused_add_rms_norm(fused_mlp(x, pair[0], pair[1], config), residual, norm_weight,
                           1e-6)

    reference = dense(linear_into_norm(silu_and_mul(engine_linear(x, gate_up, None)), down,
                                       None)).float()
    runs: dict[str, Callable[[tuple[torch.Tensor, torch.Tensor]], None]] = {"three": three}
    for config in mlp_configs():
        label = (f"fused i{config.block_i} k{config.block_k} n{config.block_n} "
                 f"w{config.num_warps}")
        try:
            agrees = _agrees(fused_mlp(x, gate_up, down, config), reference)
        except Exception as exc:  # noqa: BLE001 - an unlaunchable shape is a result too
            print(f"  {label}: {type(exc).__name__}")
            continue
        if agrees:
            runs[label] = partial(fused, config)
        else:
            print(f"  {label}: disagrees with the three launches")
    timings = {}
    for label, run in runs.items():
        def over_pairs(run: Callable[[tuple[torch.Tensor, torch.Tensor]], None] = run
                       ) -> None:
            for pair in pairs:
                run(pair)

        try:
            timings[label] = min(graph_ms(over_pairs, device) for _ in range(2)) / len(pairs)
        except Exception as exc:  # noqa: BLE001 - an unlaunchable shape is a result too
            print(f"  {label}: {type(exc).__name__}")
    if "three" not in timings:
        return [f"mlp      {rows:3d} rows  the three launches did not run"]
    base = timings["three"]
    lines = [f"mlp      {rows:3d} rows  {'three launches':32s} {base * 1e3:6.2f} us"]
    for label, ms in sorted(timings.items(), key=lambda item: item[1])[:top]:
        lines.append(f"{'':18s}{label:32s} {ms * 1e3:6.2f} us {base / ms:5.2f}x")
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
    parser.add_argument("--mlp", action="store_true",
                        help="time the fused MLP kernel against three launches instead")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shapes = {"qkv": (args.q_width + 2 * args.kv_width, args.hidden, False),
              "o": (args.hidden, args.q_width, True),
              "gate_up": (2 * args.intermediate, args.hidden, False),
              "down": (args.hidden, args.intermediate, True)}
    print(torch.cuda.get_device_name(), args.dtype)
    table: list[str] = []
    if args.mlp:
        for rows in range(1, FUSED_MLP_MAX_ROWS + 1):
            lines = sweep_mlp(args.hidden, args.intermediate, rows, dtype, args.top)
            print("\n".join(lines), flush=True)
            table += lines
        print("\n=== the MLP of a few rows: one kernel against three (norm after both) ===")
        print("\n".join(table))
        return 0
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
