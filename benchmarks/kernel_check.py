"""Triton kernel set against the torch kernel set at real shapes: correctness and timing.

    python3 benchmarks/kernel_check.py                  # CUDA, bfloat16, Qwen3-0.6B shapes
    python3 benchmarks/kernel_check.py --dtype float32
    TRITON_INTERPRET=1 python3 benchmarks/kernel_check.py --device cpu --small   # smoke run

Shapes follow Qwen3-0.6B (hidden 1024, 16 query heads, 8 KV heads, head_dim 128, MLP 3072):
a decode batch of 64 requests at 1024 tokens each, an extend of 8 requests x 512 new tokens
over 1024-token prefixes, and a mixed batch. KV slots are shuffled over the pool. Prints one
row per op: median times of both sets, the speedup, the largest difference and whether it is
within tolerance; exits 1 when any op disagrees.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.batch import ForwardBatch, build_forward_batch  # noqa: E402
from backend.sglang.kernels import torch_ops  # noqa: E402

# float8 e4m3 (an 8-bit KV pool): one step of its 3-bit mantissa, where the two sides round
# K to the model dtype differently before the pool cast
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3,
             torch.float8_e4m3fn: 0.125}


@dataclass(frozen=True)
class Shapes:
    hidden: int = 1024
    q_heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 3072
    decode_batch: int = 64
    decode_len: int = 1024
    extend_batch: int = 8
    extend_len: int = 512
    prefix_len: int = 1024

    @staticmethod
    def small() -> Shapes:
        return Shapes(hidden=64, q_heads=4, kv_heads=2, head_dim=64, intermediate=96,
                      decode_batch=3, decode_len=40, extend_batch=2, extend_len=9, prefix_len=12)


@dataclass(frozen=True)
class Row:
    op: str
    shape: str
    torch_ms: float
    triton_ms: float
    max_err: float
    ok: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median wall time of `fn` in milliseconds after a short warm-up."""
    for _ in range(3):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _outputs(result: Any) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def compare(
    op: str, shape: str, call: Callable[[Any], Any], reference_ops: Any, candidate_ops: Any,
    device: torch.device, iters: int,
) -> Row:
    """Run `call(ops)` with both sets: largest difference, tolerance check and timings."""
    expected = _outputs(call(reference_ops))
    actual = _outputs(call(candidate_ops))
    max_err, ok = 0.0, True
    for want, got in zip(expected, actual):
        tolerance = TOLERANCE[want.dtype]
        diff = (got.float() - want.float()).abs()
        max_err = max(max_err, float(diff.max()))
        ok &= bool((diff <= tolerance + tolerance * want.float().abs()).all())
        ok &= got.shape == want.shape and got.dtype == want.dtype
    reference_ms = median_ms(functools.partial(call, reference_ops), device, iters)
    candidate_ms = median_ms(functools.partial(call, candidate_ops), device, iters)
    return Row(op, shape, reference_ms, candidate_ms, max_err, ok)


def op_call(name: str, *args: Any) -> Callable[[Any], Any]:
    """`ops.<name>(*args)` for whichever kernel set `ops` is."""

    def call(ops: Any) -> Any:
        return getattr(ops, name)(*args)

    return call


class TorchStore:
    """KVPool.store as a `store_kv` op: the reference for the triton set's store_kv."""

    @staticmethod
    def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
        k_pool[slots] = k.to(k_pool.dtype)
        v_pool[slots] = v.to(v_pool.dtype)


def store_call(
    slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_shape: tuple[int, ...],
    kv_dtype: torch.dtype,
) -> Callable[[Any], Any]:
    """Store into pools of its own per kernel set and return them."""
    pools: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def call(ops: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if id(ops) not in pools:
            pools[id(ops)] = (k.new_zeros(pool_shape, dtype=kv_dtype),
                              v.new_zeros(pool_shape, dtype=kv_dtype))
        k_pool, v_pool = pools[id(ops)]
        ops.store_kv(k_pool, v_pool, slots, k, v)
        return k_pool, v_pool

    return call


def qkv_prepare_call(
    qkv: torch.Tensor, s: Shapes, positions: torch.Tensor, cache: torch.Tensor,
    head_weight: torch.Tensor, slots: torch.Tensor, pool_shape: tuple[int, ...],
    kv_dtype: torch.dtype,
) -> Callable[[Any], Any]:
    """q/k norms + rotary + K/V store (one op), into pools of its own per kernel set."""
    pools: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def call(ops: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if id(ops) not in pools:
            pools[id(ops)] = (qkv.new_zeros(pool_shape, dtype=kv_dtype),
                              qkv.new_zeros(pool_shape, dtype=kv_dtype))
        k_pool, v_pool = pools[id(ops)]
        q = ops.qkv_prepare(qkv, s.q_heads, s.kv_heads, positions, cache, head_weight,
                            head_weight, 1e-6, k_pool, v_pool, slots)
        return q, k_pool, v_pool

    return call


def paged_batch(
    prefix_lens: list[int], extend_lens: list[int], num_slots: int, device: torch.device
) -> ForwardBatch:
    free = list(range(1, num_slots + 1))
    random.Random(0).shuffle(free)
    kv_slots = []
    for prefix, extend in zip(prefix_lens, extend_lens):
        kv_slots.append(free[: prefix + extend])
        del free[: prefix + extend]
    tokens = [[0] * n for n in extend_lens]
    return build_forward_batch(tokens, prefix_lens, kv_slots, [True] * len(tokens), device)


def elementwise_rows(
    triton_ops: Any, s: Shapes, dtype: torch.dtype, device: torch.device, iters: int,
    kv_dtype: torch.dtype,
) -> list[Row]:
    rows = []
    num_slots = s.decode_batch * s.decode_len
    cache = torch_ops.build_rope_cache(s.head_dim, 4096, 1e6, None, device)
    weight = torch.randn(s.hidden, dtype=dtype, device=device)
    head_weight = torch.randn(s.head_dim, dtype=dtype, device=device)
    for label, tokens in (("decode", s.decode_batch), ("extend", s.extend_batch * s.extend_len)):
        x = torch.randn(tokens, s.hidden, dtype=dtype, device=device)
        residual = torch.randn_like(x)
        qkv_width = (s.q_heads + 2 * s.kv_heads) * s.head_dim
        qkv = torch.randn(tokens, qkv_width, dtype=dtype, device=device)
        q, k, v = qkv.split(
            (s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim), dim=-1)
        q = q.view(tokens, s.q_heads, s.head_dim)
        k = k.view(tokens, s.kv_heads, s.head_dim)
        v = v.view(tokens, s.kv_heads, s.head_dim)
        positions = torch.randint(0, 4096, (tokens,), device=device)
        gate_up = torch.randn(tokens, 2 * s.intermediate, dtype=dtype, device=device)
        slots = torch.randperm(num_slots, device=device)[:tokens] + 1
        pool_shape = (num_slots + 1, s.kv_heads, s.head_dim)
        cases = [
            ("rms_norm", f"{tokens}x{s.hidden}", torch_ops, op_call("rms_norm", x, weight, 1e-6)),
            ("fused_add_rms_norm", f"{tokens}x{s.hidden}", torch_ops,
             op_call("fused_add_rms_norm", x, residual, weight, 1e-6)),
            ("rms_norm q/k heads", f"{tokens}x{s.q_heads}x{s.head_dim}", torch_ops,
             op_call("rms_norm", q, head_weight, 1e-6)),
            ("apply_rotary", f"{tokens}x({s.q_heads}+{s.kv_heads})x{s.head_dim}", torch_ops,
             op_call("apply_rotary", q, k, positions, cache)),
            ("silu_and_mul", f"{tokens}x{2 * s.intermediate}", torch_ops,
             op_call("silu_and_mul", gate_up)),
            ("store_kv", f"{tokens}x{s.kv_heads}x{s.head_dim}", TorchStore,
             store_call(slots, k, v, pool_shape, kv_dtype)),
            ("qkv_prepare", f"{tokens}x{qkv_width}", torch_ops,
             qkv_prepare_call(qkv, s, positions, cache, head_weight, slots, pool_shape,
                              kv_dtype)),
        ]
        for op, shape, reference_ops, call in cases:
            rows.append(compare(f"{op} ({label})", shape, call, reference_ops, triton_ops,
                                device, iters))
    return rows


def linear_rows(
    triton_ops: Any, s: Shapes, dtype: torch.dtype, device: torch.device, iters: int
) -> list[Row]:
    """The decoder's four matmuls at 1 and 2 rows: cuBLAS against the triton set's `linear`
    (the GEMV kernel where its start-up measurement chose it, else cuBLAS too)."""
    from backend.sglang.kernels.triton.gemv import _CHOICE

    q_width = s.q_heads * s.head_dim
    shapes = {"qkv_proj": ((s.q_heads + 2 * s.kv_heads) * s.head_dim, s.hidden),
              "o_proj": (s.hidden, q_width), "gate_up_proj": (2 * s.intermediate, s.hidden),
              "down_proj": (s.hidden, s.intermediate)}
    rows = []
    for rows_in in (1, 2):
        for name, (out_features, in_features) in shapes.items():
            x = torch.randn(rows_in, in_features, dtype=dtype, device=device)
            weight = torch.randn(out_features, in_features, dtype=dtype, device=device) * 0.05
            call = op_call("linear", x, weight, None)
            row = compare(f"linear {name}", f"{rows_in}x{in_features}->{out_features}", call,
                          torch_ops, triton_ops, device, iters)
            choice = _CHOICE.get((rows_in, out_features, in_features, dtype, x.device))
            rows.append(Row(f"{row.op} [{'cuBLAS' if choice is None else choice}]", row.shape,
                            row.torch_ms, row.triton_ms, row.max_err, row.ok))
    return rows


def attention_rows(
    triton_ops: Any, s: Shapes, dtype: torch.dtype, device: torch.device, iters: int,
    kv_dtype: torch.dtype,
) -> list[Row]:
    half = s.extend_batch // 2 or 1
    mixed_decodes = s.decode_batch // 2 or 1
    batches = {
        f"decode {s.decode_batch}x{s.decode_len}":
            ([s.decode_len - 1] * s.decode_batch, [1] * s.decode_batch),
        f"extend {s.extend_batch}x{s.extend_len} over {s.prefix_len}":
            ([s.prefix_len] * s.extend_batch, [s.extend_len] * s.extend_batch),
        f"prefill {s.extend_batch}x{s.extend_len}":
            ([0] * s.extend_batch, [s.extend_len] * s.extend_batch),
        f"mixed {half}x{s.extend_len}+{mixed_decodes} decodes":
            ([s.prefix_len] * half + [s.decode_len - 1] * mixed_decodes,
             [s.extend_len] * half + [1] * mixed_decodes),
    }
    rows = []
    scale = s.head_dim**-0.5
    for label, (prefix_lens, extend_lens) in batches.items():
        num_slots = sum(prefix_lens) + sum(extend_lens) + 16
        batch = paged_batch(prefix_lens, extend_lens, num_slots, device)
        k_pool, v_pool = random_pools((num_slots + 1, s.kv_heads, s.head_dim), kv_dtype, device)
        q = torch.randn(batch.num_tokens, s.q_heads, s.head_dim, dtype=dtype, device=device)

        call = op_call("paged_attention", q, k_pool, v_pool, batch, scale, s.kv_heads)
        rows.append(compare("paged_attention", label, call, torch_ops, triton_ops, device, iters))
    return rows + cascade_rows(triton_ops, s, dtype, device, iters, kv_dtype)


def random_pools(shape: tuple[int, ...], kv_dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    k_pool = torch.randn(shape, device=device).to(kv_dtype)
    return k_pool, torch.randn(shape, device=device).to(kv_dtype)


def cascade_rows(
    triton_ops: Any, s: Shapes, dtype: torch.dtype, device: torch.device, iters: int,
    kv_dtype: torch.dtype,
) -> list[Row]:
    """A decode batch in groups of CASCADE_MAX_ROWS sharing a decode_len prefix (plus 128
    tokens each of their own), without and with its cascade plan."""
    from backend.cascade import CASCADE_MAX_ROWS, plan_cascade

    group_rows = min(CASCADE_MAX_ROWS, s.decode_batch)
    groups, own = max(1, s.decode_batch // group_rows), min(128, s.decode_len)
    free = list(range(1, groups * (s.decode_len + group_rows * own) + 1))
    random.Random(1).shuffle(free)
    lists = []
    for _ in range(groups):
        prefix, free = free[: s.decode_len], free[s.decode_len:]
        for _ in range(group_rows):
            lists.append(prefix + free[:own])
            free = free[own:]
    batch = build_forward_batch([[0]] * len(lists), [len(x) - 1 for x in lists], lists,
                                [True] * len(lists), device)
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    planned = dataclasses.replace(
        batch, cascade=torch.tensor(plan, dtype=torch.int64, device=device).view(4, -1))
    num_slots = max(max(x) for x in lists)
    k_pool, v_pool = random_pools((num_slots + 1, s.kv_heads, s.head_dim), kv_dtype, device)
    q = torch.randn(len(lists), s.q_heads, s.head_dim, dtype=dtype, device=device)
    scale = s.head_dim**-0.5

    def call_with(forward_batch: ForwardBatch) -> Callable[[Any], Any]:
        def call(ops: Any) -> Any:
            ops.prepare_attention(forward_batch)
            return ops.paged_attention(q, k_pool, v_pool, forward_batch, scale, s.kv_heads)
        return call

    label = f"{groups}x{group_rows} rows share {s.decode_len} (+{own})"
    return [compare(f"paged_attention {how}", label, call_with(b), torch_ops, triton_ops,
                    device, iters)
            for how, b in (("no plan", batch), ("cascade", planned))]


def table(rows: list[Row]) -> str:
    header = f"{'op':<30} {'shape':<28} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} " \
             f"{'max err':>9}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = r.torch_ms / r.triton_ms if r.triton_ms > 0 else float("nan")
        lines.append(f"{r.op:<30} {r.shape:<28} {r.torch_ms:>9.3f} {r.triton_ms:>9.3f} "
                     f"{speedup:>7.2f}x {r.max_err:>9.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


def split_k_rows(
    triton_ops: Any, s: Shapes, dtype: torch.dtype, device: torch.device, iters: int
) -> list[Row]:
    """o_proj and down_proj with the residual add + RMSNorm after them: torch against every
    split-K launch shape (float32 partials the norm adds up), and against the triton set's
    own `linear_into_norm` (split-K where its start-up measurement chose it, else cuBLAS)."""
    from backend.sglang.kernels.triton.split_k import CANDIDATES, split_k_linear

    shapes = {"o_proj": (s.hidden, s.q_heads * s.head_dim), "down_proj": (s.hidden, s.intermediate)}
    rows = []
    for rows_in in (4, 64):
        for name, (out_features, in_features) in shapes.items():
            x = torch.randn(rows_in, in_features, dtype=dtype, device=device)
            weight = torch.randn(out_features, in_features, dtype=dtype, device=device) * 0.05
            residual = torch.randn(rows_in, out_features, dtype=dtype, device=device)
            norm_weight = 1.0 + 0.1 * torch.randn(out_features, dtype=dtype, device=device)
            for config in (None, *CANDIDATES):
                def call(ops: Any, config: Any = config, args: Any = (x, weight, residual,
                                                                      norm_weight)) -> Any:
                    x, weight, residual, norm_weight = args
                    if ops is torch_ops or config is None:
                        y = ops.linear_into_norm(x, weight, None)
                    else:
                        y = split_k_linear(x, weight, config)
                    return ops.fused_add_rms_norm(y, residual, norm_weight, 1e-6)

                label = "linear_into_norm" if config is None else (
                    f"split-K m{config.block_m} n{config.block_n} k{config.block_k} "
                    f"s{config.splits}")
                row = compare(f"{name} + add_rms_norm", f"{rows_in}x{in_features}", call,
                              torch_ops, triton_ops, device, iters)
                rows.append(Row(f"{row.op} [{label}]", row.shape, row.torch_ms, row.triton_ms,
                                row.max_err, row.ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny shapes (interpreter runs)")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                        help="the KV pools of store_kv, qkv_prepare and attention")
    args = parser.parse_args(argv)
    from backend.sglang.kernels import triton_ops

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8_e4m3" else dtype
    shapes = Shapes.small() if args.small else Shapes()
    torch.manual_seed(0)
    rows = elementwise_rows(triton_ops, shapes, dtype, device, args.iters, kv_dtype)
    rows += attention_rows(triton_ops, shapes, dtype, device, args.iters, kv_dtype)
    rows += linear_rows(triton_ops, shapes, dtype, device, args.iters)
    rows += split_k_rows(triton_ops, shapes, dtype, device, args.iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, {args.dtype}, KV {kv_dtype}, {shapes}")
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
