"""Launch configurations of the paged attention kernels against each other (CUDA).

    python3 -m benchmarks.attention_sweep                 # decode, Qwen3-0.6B heads, bf16
    python3 -m benchmarks.attention_sweep --extend        # the extend (prefill) kernel
    python3 -m benchmarks.attention_sweep --top 5

Decode: for each batch shape (the offline workload's mid-run batches, a shared-prefix batch, a
short batch and batch 1) every combination of block size, warps, pipeline stages and split
factor is timed; the table gives the effective KV read bandwidth (K and V bytes of every
request's context over the kernel time, merge included) of the default launch and of the best
ones. Extend: query and key block sizes, warps and stages for prefill chunks, questions over
a long cached prefix and chunks over a medium one. Times are CUDA-graph replays
(`triton.testing.do_bench_cudagraph`): kernel time without the host's launch cost. Slots are
laid out as the pool hands them out: one contiguous run per request.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.batch import prefix_heavy  # noqa: E402
from backend.sglang.kernels.triton.decode_attention import (  # noqa: E402
    choose_long_block_splits,
    decode_attention,
)
from backend.sglang.kernels.triton.extend_attention import extend_attention  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    seq_lens: list[int]


@dataclass(frozen=True)
class Launch:
    block_n: int
    num_warps: int | None
    num_stages: int | None
    split_factor: int

    def label(self) -> str:
        return (f"block_n={self.block_n} warps={self.num_warps or 'dflt'} "
                f"stages={self.num_stages or 'dflt'} splits x{self.split_factor}")


DEFAULT = Launch(128, None, 2, 1)  # the engine's launch on cards with long-block memory


def cases(rng: random.Random) -> list[Case]:
    return [
        Case("offline b256", [rng.randint(100, 2048) for _ in range(256)]),
        Case("offline b128", [rng.randint(100, 2048) for _ in range(128)]),
        Case("shared b256x2300", [2300] * 256),
        Case("b64x1024", [1024] * 64),
        Case("b16x2048", [2048] * 16),
        Case("b1x512", [512]),
    ]


def launches() -> list[Launch]:
    grid = itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4), (1, 2, 4))
    return [DEFAULT] + [Launch(*values) for values in grid]


class _Launch(Protocol):
    def label(self) -> str: ...


L = TypeVar("L", bound=_Launch)


def time_launches(name: str, candidates: list[L], call: Callable[[L], torch.Tensor],
                  reference: torch.Tensor, rep_ms: int) -> list[tuple[float, L]]:
    """(ms, launch) of every candidate that runs and agrees with the reference; CUDA-graph
    replays, so the host's launch cost is not in the figure."""
    from triton.testing import do_bench_cudagraph

    results: list[tuple[float, L]] = []
    for launch in candidates:
        label = launch.label()
        try:
            err = (call(launch) - reference).abs().max().item()
            ms = float(do_bench_cudagraph(functools.partial(call, launch), rep=rep_ms))
        except Exception as exc:  # noqa: BLE001 - an unlaunchable config is a result too
            print(f"  {name}: {label} failed: {type(exc).__name__}")
            continue
        if err > 0.05:
            print(f"  {name}: {label} disagrees by {err:.3g}")
            continue
        results.append((ms, launch))
    return results


def random_pools(total: int, args: argparse.Namespace, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools of `total` slots (plus the padding slot), in --kv-dtype."""
    kv_dtype = getattr(torch, args.kv_dtype or args.dtype)
    shape = (total + 1, args.kv_heads, args.head_dim)
    k_pool = torch.randn(shape, dtype=getattr(torch, args.dtype), device=device)
    return k_pool.to(kv_dtype), torch.randn_like(k_pool).to(kv_dtype)


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> list[str]:
    dtype = getattr(torch, args.dtype)
    total = sum(case.seq_lens)
    k_pool, v_pool = random_pools(total, args, device)
    kv_indptr = torch.tensor([0, *itertools.accumulate(case.seq_lens)], dtype=torch.int32,
                             device=device)
    kv_indices = torch.arange(1, total + 1, dtype=torch.int32, device=device)
    q = torch.randn(len(case.seq_lens), args.q_heads, args.head_dim, dtype=dtype, device=device)
    nbytes = 2 * k_pool.element_size() * total * args.kv_heads * args.head_dim
    base_splits = choose_long_block_splits(len(case.seq_lens), args.kv_heads, 40960, device)
    reference = decode_attention(q, k_pool, v_pool, kv_indptr, kv_indices, 0.088, base_splits)
    def call(launch: Launch) -> torch.Tensor:
        splits = min(32, base_splits * launch.split_factor)
        return decode_attention(q, k_pool, v_pool, kv_indptr, kv_indices, 0.088, splits,
                                block_n=launch.block_n, num_warps=launch.num_warps,
                                num_stages=launch.num_stages)

    results = time_launches(case.name, launches(), call, reference, args.rep_ms)
    default_ms = next(ms for ms, launch in results if launch == DEFAULT)
    lines = [f"{case.name:18s} {'default':52s} {default_ms * 1e3:8.1f} us "
             f"{nbytes / default_ms / 1e6:7.0f} GB/s  (splits {base_splits})"]
    for ms, launch in sorted(results, key=lambda r: r[0])[: args.top]:
        lines.append(f"{'':18s} {launch.label():52s} {ms * 1e3:8.1f} us "
                     f"{nbytes / ms / 1e6:7.0f} GB/s  {default_ms / ms:5.2f}x")
    return lines


@dataclass(frozen=True)
class ExtendCase:
    name: str
    prefix_lens: list[int]
    extend_lens: list[int]


@dataclass(frozen=True)
class ExtendLaunch:
    block_m: int | None  # None: the kernel's own choice from the batch's shape
    block_n: int
    num_warps: int | None
    num_stages: int | None

    def label(self) -> str:
        return (f"block_m={self.block_m or 'auto'} block_n={self.block_n} "
                f"warps={self.num_warps or 'dflt'} stages={self.num_stages or 'dflt'}")


EXTEND_DEFAULT = ExtendLaunch(None, 64, None, None)


def extend_cases() -> list[ExtendCase]:
    return [
        ExtendCase("prefill 8x1024", [0] * 8, [1024] * 8),
        ExtendCase("offline chunk 14x100-1024", [0] * 14,
                   [random.Random(0).randint(100, 1024) for _ in range(14)]),
        ExtendCase("64 questions 128 over 2048", [2048] * 64, [128] * 64),
        ExtendCase("16 chunks 512 over 512", [512] * 16, [512] * 16),
    ]


def extend_launches() -> list[ExtendLaunch]:
    grid = itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
    return [EXTEND_DEFAULT] + [ExtendLaunch(*values) for values in grid]


def run_extend_case(case: ExtendCase, args: argparse.Namespace, device: torch.device
                    ) -> list[str]:
    dtype = getattr(torch, args.dtype)
    seq_lens = [p + e for p, e in zip(case.prefix_lens, case.extend_lens)]
    total = sum(seq_lens)
    k_pool, v_pool = random_pools(total, args, device)

    def indptr(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64,
                            device=device)

    qo_indptr, kv_indptr = indptr(case.extend_lens), indptr(seq_lens)
    kv_indices = torch.arange(1, total + 1, dtype=torch.int64, device=device)
    q = torch.randn(sum(case.extend_lens), args.q_heads, args.head_dim, dtype=dtype,
                    device=device)
    longest = max(case.extend_lens)
    prefix = prefix_heavy(list(zip(case.extend_lens, case.prefix_lens)))
    reference = extend_attention(q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, 0.088,
                                 longest, prefix)
    def call(launch: ExtendLaunch) -> torch.Tensor:
        return extend_attention(q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, 0.088,
                                longest, prefix, block_m=launch.block_m, block_n=launch.block_n,
                                num_warps=launch.num_warps, num_stages=launch.num_stages)

    results = time_launches(case.name, extend_launches(), call, reference, args.rep_ms)
    default_ms = next(ms for ms, launch in results if launch == EXTEND_DEFAULT)
    lines = [f"{case.name:28s} {'default':48s} {default_ms * 1e3:8.1f} us"]
    for ms, launch in sorted(results, key=lambda r: r[0])[: args.top]:
        lines.append(f"{'':28s} {launch.label():48s} {ms * 1e3:8.1f} us "
                     f"{default_ms / ms:5.2f}x")
    return lines


def read_bandwidth(device: torch.device) -> float:
    """TB/s of a read-only reduction over 2 GiB: what the attention kernels' rates compare to
    (the card's practical read bandwidth, below its nominal one)."""
    from triton.testing import do_bench_cudagraph

    data = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    seconds = do_bench_cudagraph(lambda: data.sum(), rep=100) / 1000
    return data.numel() * data.element_size() / seconds / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-dtype", default="",
                        help="the KV pools' dtype, e.g. float8_e4m3fn (default: --dtype)")
    parser.add_argument("--q-heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--rep-ms", type=int, default=30)
    parser.add_argument("--extend", action="store_true",
                        help="sweep the extend kernel instead of the decode kernel")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), args.dtype, "KV", args.kv_dtype or args.dtype)
    print(f"the card's read bandwidth (a sum over 2 GiB): {read_bandwidth(device):.2f} TB/s")
    table = []
    if args.extend:
        for extend_case in extend_cases():
            table += run_extend_case(extend_case, args, device)
            print("\n".join(table[-args.top - 1:]), flush=True)
    else:
        for case in cases(random.Random(0)):
            table += run_case(case, args, device)
            print("\n".join(table[-args.top - 1:]), flush=True)
    print(f"\n=== {'extend' if args.extend else 'decode'} attention launches ===")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
