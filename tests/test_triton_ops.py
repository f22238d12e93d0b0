"""The triton kernel set against the torch reference, under the Triton CPU interpreter."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Triton picks interpreter or compiler when it is first imported (its own jitted helpers such
# as `tl.sum` are built then), so the switch must come before anything imports it.
_IMPORTED_FOR_CUDA = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("triton")
if _IMPORTED_FOR_CUDA:
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (transformers' modeling code "
        "imports it); set it in tests/conftest.py or run this file on its own",
        allow_module_level=True,
    )

from transformers import Qwen3Config  # noqa: E402

from backend.batch import (  # noqa: E402
    ForwardBatch,
    aligned_plan,
    build_forward_batch,
    plan_view,
)
from backend.kv_pool import KV_FP8, KVPool  # noqa: E402
from backend.sglang.kernels import load_kernel_set, torch_ops  # noqa: E402
from backend.sglang.kernels.triton.decode_attention import (  # noqa: E402
    ROW_ORDER_MIN_ROWS,
    decode_attention,
    longest_first,
    merge_splits,
)
from backend.sglang.kernels.triton.extend_attention import (  # noqa: E402
    extend_attention,
    tile_tokens,
)
from backend.sglang.runner import NativeRunner  # noqa: E402

CPU = torch.device("cpu")
EPS = 1e-6
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # atol = rtol
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    return load_kernel_set("triton")  # type: ignore[return-value]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    tolerance = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype)


def test_registered_as_default_only_on_cuda() -> None:
    from backend.sglang.kernels import default_kernel_set

    assert default_kernel_set(CPU) == "torch"
    assert default_kernel_set(torch.device("cuda")) == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 80])
def test_rms_norm_rows(ops: ModuleType, dtype: torch.dtype, dim: int) -> None:
    x = _randn(5, dim, dtype=dtype) * 3
    weight = _randn(dim, dtype=dtype, seed=1)
    _close(ops.rms_norm(x, weight, EPS), torch_ops.rms_norm(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_a_fused_qkv_view(ops: ModuleType, dtype: torch.dtype) -> None:
    num_tokens, heads, head_dim = 3, 4, 16
    qkv = _randn(num_tokens, heads * head_dim + 32, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    assert not q.is_contiguous()
    weight = _randn(head_dim, dtype=dtype, seed=1)
    _close(ops.rms_norm(q, weight, EPS), torch_ops.rms_norm(q, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 96])
def test_fused_add_rms_norm(ops: ModuleType, dtype: torch.dtype, dim: int) -> None:
    x = _randn(4, dim, dtype=dtype)
    residual = _randn(4, dim, dtype=dtype, seed=2)
    weight = _randn(dim, dtype=dtype, seed=3)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = ops.fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_residual = torch_ops.fused_add_rms_norm(x, residual, weight, EPS)
    _close(out, ref_out)
    _close(new_residual, ref_residual)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_apply_rotary(ops: ModuleType, dtype: torch.dtype, head_dim: int) -> None:
    num_tokens, q_heads, kv_heads = 5, 4, 2
    scaling = {"rope_type": "linear", "factor": 2.0} if head_dim == 80 else None
    cache = ops.build_rope_cache(head_dim, 64, 10000.0, scaling, CPU)
    qkv = _randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split((q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.view(num_tokens, q_heads, head_dim)
    k = k.view(num_tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 7, 3, 63, 12])
    q_out, k_out = ops.apply_rotary(q, k, positions, cache)
    q_ref, k_ref = torch_ops.apply_rotary(q, k, positions, cache)
    _close(q_out, q_ref)
    _close(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(ops: ModuleType, dtype: torch.dtype) -> None:
    x = _randn(2, 3, 2 * 48, dtype=dtype) * 4
    _close(ops.silu_and_mul(x), torch_ops.silu_and_mul(x))


@pytest.mark.parametrize(("kv_dtype", "pool_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
])
def test_store_kv_matches_pool_store(
    ops: ModuleType, kv_dtype: torch.dtype, pool_dtype: torch.dtype
) -> None:
    pool = KVPool(1, 12, 2, 80, pool_dtype, CPU)
    reference = KVPool(1, 12, 2, 80, pool_dtype, CPU)
    kv = _randn(4, 2 * 2 * 80, dtype=kv_dtype)
    k = kv[:, : 2 * 80].view(4, 2, 80)
    v = kv[:, 2 * 80 :].view(4, 2, 80)
    slots = torch.tensor([9, 2, 11, 5])
    ops.store_kv(pool.k[0], pool.v[0], slots, k, v)
    reference.store(0, slots, k, v)
    if kv_dtype == pool_dtype:
        assert torch.equal(pool.k[0], reference.k[0])
        assert torch.equal(pool.v[0], reference.v[0])
    else:  # the interpreter rounds float32 -> bfloat16 toward zero, CUDA to nearest
        _close(pool.k[0], reference.k[0])
        _close(pool.v[0], reference.v[0])
    assert pool.k[0][[0, 1, 3]].abs().sum() == 0


def _batch(
    prefix_lens: list[int], extend_lens: list[int], num_slots: int, seed: int = 0
) -> ForwardBatch:
    """A batch whose requests own disjoint, shuffled slots of a pool of `num_slots`."""
    rng = random.Random(seed)
    free = list(range(1, num_slots + 1))
    rng.shuffle(free)
    kv_slots = []
    for prefix, extend in zip(prefix_lens, extend_lens):
        kv_slots.append(free[: prefix + extend])
        del free[: prefix + extend]
    token_ids = [[1] * n for n in extend_lens]
    return build_forward_batch(token_ids, prefix_lens, kv_slots, [True] * len(prefix_lens), CPU)


def _pools(num_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    k = _randn(num_slots + 1, kv_heads, head_dim, dtype=dtype, seed=5)
    v = _randn(num_slots + 1, kv_heads, head_dim, dtype=dtype, seed=6)
    return k, v


def _check_attention(
    ops: ModuleType, prefix_lens: list[int], extend_lens: list[int], q_heads: int,
    kv_heads: int, head_dim: int, dtype: torch.dtype,
) -> None:
    num_slots = sum(prefix_lens) + sum(extend_lens) + 7
    batch = _batch(prefix_lens, extend_lens, num_slots)
    k_pool, v_pool = _pools(num_slots, kv_heads, head_dim, dtype)
    q = _randn(batch.num_tokens, q_heads, head_dim, dtype=dtype, seed=7)
    scale = head_dim**-0.5
    out = ops.paged_attention(q, k_pool, v_pool, batch, scale, kv_heads)
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, scale, kv_heads))


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "dtype"),
    [(2, 2, 64, torch.float32), (4, 2, 128, torch.float32), (4, 1, 80, torch.bfloat16),
     (2, 2, 64, torch.bfloat16)],
)
def test_decode_attention_ragged_shuffled_slots(
    ops: ModuleType, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    _check_attention(ops, [0, 70, 9], [1, 1, 1], q_heads, kv_heads, head_dim, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 8, 20])
def test_decode_attention_splits_agree(num_splits: int) -> None:
    prefix_lens, kv_heads, q_heads, head_dim = [40, 3, 17], 2, 4, 64
    batch = _batch(prefix_lens, [1, 1, 1], 80, seed=num_splits)
    k_pool, v_pool = _pools(80, kv_heads, head_dim, torch.float32)
    q = _randn(3, q_heads, head_dim, dtype=torch.float32, seed=8)
    out = decode_attention(
        q, k_pool, v_pool, batch.kv_indptr, batch.kv_indices, 0.125, num_splits, block_n=16
    )
    expected = torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, kv_heads)
    _close(out, expected)


@pytest.mark.parametrize("lengths", [[5], [3, 9, 9, 1, 9, 4],
                                     [random.Random(0).randint(1, 40) for _ in range(150)]])
def test_longest_first_is_a_stable_descending_order(lengths: list[int]) -> None:
    """More rows than one program's block (64) too; equal lengths keep their row order."""
    indptr = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    expected = sorted(range(len(lengths)), key=lambda row: (-lengths[row], row))
    order = longest_first(indptr)
    assert order.dtype == torch.int32
    assert order.tolist() == expected


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_in_a_row_order_is_the_same(num_splits: int) -> None:
    """Programs started longest request first write every row where it belongs: bit for bit
    the output of the plain launch, whatever the slices."""
    prefix_lens = [5, 60, 0, 33, 33, 12, 47, 2, 19]
    batch = _batch(prefix_lens, [1] * len(prefix_lens), 230, seed=num_splits)
    k_pool, v_pool = _pools(230, 2, 64, torch.float32)
    q = _randn(len(prefix_lens), 4, 64, dtype=torch.float32, seed=9)
    plain = decode_attention(q, k_pool, v_pool, batch.kv_indptr, batch.kv_indices, 0.125,
                             num_splits, block_n=16)
    ordered = decode_attention(q, k_pool, v_pool, batch.kv_indptr, batch.kv_indices, 0.125,
                               num_splits, block_n=16, row_order=longest_first(batch.kv_indptr))
    assert torch.equal(ordered, plain)


def test_a_decode_batch_gets_its_row_order_and_matches_torch(ops: ModuleType) -> None:
    """From ROW_ORDER_MIN_ROWS rows `prepare_attention` leaves the launch order for every
    layer's attention; the result is still the reference attention."""
    prefix_lens = [(7 * row + 3) % 41 for row in range(ROW_ORDER_MIN_ROWS + 1)]
    batch = _batch(prefix_lens, [1] * len(prefix_lens), 200)
    ops.prepare_attention(batch)
    order = batch.attention_state["row_order"]
    assert order.tolist() == sorted(range(len(prefix_lens)), key=lambda r: (-prefix_lens[r], r))
    k_pool, v_pool = _pools(200, 2, 64, torch.float32)
    q = _randn(len(prefix_lens), 4, 64, dtype=torch.float32, seed=10)
    _close(ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2),
           torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2))
    small = _batch([4, 8], [1, 1], 20)
    ops.prepare_attention(small)
    assert small.attention_state == {}


@pytest.mark.parametrize("num_slices", [1, 8, 21, 32, 70])
def test_merge_walks_every_slice(num_slices: int) -> None:
    """The merge kernel reads the slices a chunk at a time (8 or 32): any count, within one
    chunk, filling it exactly or spilling into a partial last one, gives the softmax-weighted
    mean; empty slices (log-sum-exp -inf) weigh nothing, and a row of only empty slices is 0."""
    partial = _randn(2, 3, num_slices, 16, dtype=torch.float32, seed=num_slices)
    lse = _randn(2, 3, num_slices, dtype=torch.float32, seed=num_slices + 1) * 4
    lse[0, 1, 0] = float("-inf")
    lse[1, 2, :] = float("-inf")  # a row with no keys at all: zeros
    out = torch.empty(2, 3, 16)
    merge_splits(partial, lse, out, num_slices)
    weights = torch.softmax(lse * math.log(2.0), dim=-1).nan_to_num(0.0)  # base-2 lse
    _close(out, (partial * weights[..., None]).sum(dim=2))


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim", "dtype"),
    [(2, 2, 64, torch.float32), (4, 2, 128, torch.bfloat16), (3, 1, 80, torch.float32)],
)
def test_extend_attention_over_prefixes(
    ops: ModuleType, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    _check_attention(ops, [0, 13, 4], [6, 3, 9], q_heads, kv_heads, head_dim, dtype)


def test_extend_tile_size_follows_the_work() -> None:
    """256-row tiles where attention to cached prefixes outweighs the causal part and a run
    of new tokens is longer than a 64-row tile; 64 rows otherwise, in float32, and at most
    MAX_TILE_ELEMENTS over a wide head."""
    assert tile_tokens(2, 128, 2, 128, prefix_heavy=True) == 128  # 256 rows, 2 heads each
    assert tile_tokens(2, 128, 2, 1024, prefix_heavy=False) == 32
    assert tile_tokens(2, 128, 2, 20, prefix_heavy=True) == 32  # fits one small tile
    assert tile_tokens(2, 128, 4, 128, prefix_heavy=True) == 32  # float32
    assert tile_tokens(1, 256, 2, 128, prefix_heavy=True) == 128  # 128 rows of 256 dims
    assert tile_tokens(8, 128, 2, 100, prefix_heavy=True) == 32


@pytest.mark.parametrize(("prefix_lens", "shape"), [
    ([70, 0, 0], (90, False)),  # the new tokens' causal part dominates: 64-row tiles
    ([140, 13, 70], (90, True)),  # the cached prefixes' part does: 256-row tiles
])
def test_extend_tiles_follow_the_batch_shape(ops: ModuleType, prefix_lens: list[int],
                                             shape: tuple[int, bool]) -> None:
    """Both tile sizes against torch, with prefixes past a 64-key block (the unmasked pass
    runs); bfloat16, as float32 queries keep 64-row tiles."""
    extend_lens = [40, 3, 90, 1]
    batch = _batch(prefix_lens + [7], extend_lens, sum(prefix_lens) + 7 + 134 + 4)
    assert batch.extend_shape == shape  # the one-token request counts in neither
    _check_attention(ops, prefix_lens + [7], extend_lens, 4, 2, 64, torch.bfloat16)


def test_extend_attention_small_blocks_cross_the_diagonal() -> None:
    prefix_lens, extend_lens, kv_heads, q_heads, head_dim = [0, 21], [37, 20], 1, 2, 64
    batch = _batch(prefix_lens, extend_lens, 90, seed=3)
    # the second request is a chunk in the middle of a prefill: it samples nothing
    batch = build_forward_batch(
        [[1] * n for n in extend_lens], prefix_lens,
        [batch.kv_indices[:37].tolist(), batch.kv_indices[37:].tolist()], [True, False], CPU,
    )
    k_pool, v_pool = _pools(90, kv_heads, head_dim, torch.float32)
    q = _randn(batch.num_tokens, q_heads, head_dim, dtype=torch.float32, seed=9)
    out = extend_attention(
        q, k_pool, v_pool, batch.qo_indptr, batch.kv_indptr, batch.kv_indices, 0.125,
        max(extend_lens), block_m=16, block_n=16,
    )
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, kv_heads))


@pytest.mark.parametrize(("q_heads", "kv_heads", "block_m"), [(6, 2, 16), (8, 2, 8), (2, 2, 32)])
def test_extend_attention_groups_heads_across_key_blocks(q_heads: int, kv_heads: int,
                                                         block_m: int) -> None:
    """A program takes a block of tokens for every query head of its KV head (groups of 3, 4
    and 1 here, the 3 padded to 4): prefixes that end inside a key block or one key short
    of its end (14, 30: the unmasked pass must stop before that block), a one-token
    request, all against torch."""
    prefix_lens, extend_lens, head_dim = [45, 14, 0, 15, 17, 30], [23, 20, 40, 18, 1, 34], 64
    num_slots = sum(prefix_lens) + sum(extend_lens) + 5
    batch = _batch(prefix_lens, extend_lens, num_slots, seed=block_m)
    k_pool, v_pool = _pools(num_slots, kv_heads, head_dim, torch.float32)
    q = _randn(batch.num_tokens, q_heads, head_dim, dtype=torch.float32, seed=11)
    out = extend_attention(
        q, k_pool, v_pool, batch.qo_indptr, batch.kv_indptr, batch.kv_indices, 0.125,
        max(extend_lens), block_m=block_m, block_n=16,
    )
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, kv_heads))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_decode_and_extend_batch(ops: ModuleType, dtype: torch.dtype) -> None:
    _check_attention(ops, [20, 0, 5, 11], [1, 7, 1, 4], 4, 2, 64, dtype)


def test_native_runner_with_triton_kernels_matches_torch(tmp_path: Path) -> None:
    """A tiny Qwen3 (q/k norm, GQA) through prefill, a mixed step and a decode step."""
    config = Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, eos_token_id=2, architectures=["Qwen3ForCausalLM"],
    )
    config.save_pretrained(tmp_path)
    runners = {
        name: NativeRunner(str(tmp_path), config, dtype=torch.float32, device=CPU,
                           num_kv_slots=40, load_format="dummy", seed=0, kernel_set=name)
        for name in ("torch", "triton")
    }
    slots = {"a": [31, 4, 17, 8, 22, 1, 39, 12, 5, 27, 33], "b": [9, 14, 2, 36, 20, 11, 25, 6, 30]}
    steps = [  # (new tokens, prefix length) per request
        {"a": ([5, 9, 3, 7, 1, 8, 2, 6, 4], 0), "b": ([11, 12, 13, 14, 15], 0)},
        {"a": ([40], 9), "b": ([16, 17, 18], 5)},
        {"a": ([41], 10), "b": ([19], 8)},
    ]
    for step in steps:
        batch = build_forward_batch(
            [tokens for tokens, _ in step.values()],
            [prefix for _, prefix in step.values()],
            [slots[name][: prefix + len(tokens)] for name, (tokens, prefix) in step.items()],
            [True] * len(step), CPU,
        )
        logits = {name: runner.forward(batch) for name, runner in runners.items()}
        torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "norms"), [(64, True), (80, False), (128, True)])
def test_qkv_prepare_matches_the_separate_ops(
    ops: ModuleType, dtype: torch.dtype, head_dim: int, norms: bool
) -> None:
    num_tokens, q_heads, kv_heads = 5, 6, 2
    cache = ops.build_rope_cache(head_dim, 64, 10000.0, None, CPU)
    qkv = _randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    q_norm = _randn(head_dim, dtype=dtype, seed=1) if norms else None
    k_norm = _randn(head_dim, dtype=dtype, seed=2) if norms else None
    positions = torch.tensor([0, 7, 3, 63, 12])
    slots = torch.tensor([9, 2, 11, 5, 1])
    pools = [KVPool(1, 12, kv_heads, head_dim, dtype, CPU) for _ in range(2)]
    q = ops.qkv_prepare(qkv, q_heads, kv_heads, positions, cache, q_norm, k_norm, EPS,
                        pools[0].k[0], pools[0].v[0], slots)
    q_ref = torch_ops.qkv_prepare(qkv, q_heads, kv_heads, positions, cache, q_norm, k_norm,
                                  EPS, pools[1].k[0], pools[1].v[0], slots)
    _close(q, q_ref)
    _close(pools[0].k[0], pools[1].k[0])
    assert torch.equal(pools[0].v[0], pools[1].v[0])
    assert pools[0].k[0][[0, 3, 4]].abs().sum() == 0


@pytest.mark.parametrize(("prefix_lens", "extend_lens"), [
    ([20, 0, 5, 11], [1, 7, 1, 4]),  # mixed: the extend kernel, then the decode rows
    ([9, 30], [1, 1]),  # decode
])
@pytest.mark.parametrize("kernel_set", ["torch", "triton"])
def test_ops_write_into_given_outputs(kernel_set: str, prefix_lens: list[int],
                                      extend_lens: list[int]) -> None:
    """`out=` (the piecewise graphs' static buffers): the same values as without, written
    into the tensor given, for `qkv_prepare` and for attention, in both kernel sets."""
    ops = load_kernel_set(kernel_set)
    q_heads, kv_heads, head_dim, dtype = 4, 2, 64, torch.bfloat16
    num_slots = sum(prefix_lens) + sum(extend_lens) + 7
    batch = _batch(prefix_lens, extend_lens, num_slots)
    tokens = batch.num_tokens
    cache = ops.build_rope_cache(head_dim, 64, 10000.0, None, CPU)
    qkv = _randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    norm = _randn(head_dim, dtype=dtype, seed=1)
    positions = torch.arange(tokens) % 64
    pools = [KVPool(1, num_slots, kv_heads, head_dim, dtype, CPU) for _ in range(2)]
    q_buffer = torch.full((tokens, q_heads, head_dim), float("nan"), dtype=dtype)
    for pool, out in zip(pools, (None, q_buffer)):
        pool.k[0].copy_(_randn(*pool.k[0].shape, dtype=dtype, seed=4))
        pool.v[0].copy_(_randn(*pool.v[0].shape, dtype=dtype, seed=5))
        result = ops.qkv_prepare(qkv, q_heads, kv_heads, positions, cache, norm, norm, EPS,
                                 pool.k[0], pool.v[0], batch.out_slots, out=out)
    assert result is q_buffer
    q = ops.qkv_prepare(qkv, q_heads, kv_heads, positions, cache, norm, norm, EPS,
                        pools[0].k[0], pools[0].v[0], batch.out_slots)
    assert torch.equal(q_buffer, q)
    expected = ops.paged_attention(q, pools[0].k[0], pools[0].v[0], batch, 0.125, kv_heads)
    buffer = torch.full((tokens, q_heads * head_dim), float("nan"), dtype=dtype)
    result = ops.paged_attention(q, pools[1].k[0], pools[1].v[0], batch, 0.125, kv_heads,
                                 out=buffer.view(tokens, q_heads, head_dim))
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer.view(tokens, q_heads, head_dim), expected)


@pytest.mark.parametrize(("rows", "out_features", "in_features", "bias"),
                         [(1, 24, 96, False), (2, 17, 80, True), (2, 8, 200, False)])
def test_gemv_matches_linear(rows: int, out_features: int, in_features: int,
                             bias: bool) -> None:
    """The small-batch linear kernel: ragged output and input dims, every row count up to
    its limit, with and without bias, over one and several K chunks, two tile shapes."""
    from backend.sglang.kernels.triton.gemv import GemvConfig, gemv

    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(rows, in_features, dtype=dtype, seed=11)
        weight = _randn(out_features, in_features, dtype=dtype, seed=12)
        b = _randn(out_features, dtype=dtype, seed=13) if bias else None
        expected = torch.nn.functional.linear(x.float(), weight.float(),
                                              None if b is None else b.float()).to(dtype)
        for config in (GemvConfig(4, 64, 4), GemvConfig(16, 32, 4)):
            _close(gemv(x, weight, b, config), expected)
            buffer = torch.full((rows, out_features), float("nan"), dtype=dtype)
            result = gemv(x, weight, b, config, out=buffer)
            assert result.data_ptr() == buffer.data_ptr()
            _close(buffer, expected)


@pytest.mark.parametrize(("rows", "out_features", "in_features"),
                         [(1, 24, 96), (5, 40, 200), (20, 33, 130)])
def test_split_k_partials_sum_to_the_linear(rows: int, out_features: int,
                                            in_features: int) -> None:
    """The split-K kernel's float32 partials add up to x W^T (ragged rows, columns and input
    dim, several row and column blocks, a last slice shorter than the others), and the
    fused add + norm that reads them gives the torch reference's result for the same sum."""
    from backend.sglang.kernels.triton.norm import fused_add_rms_norm
    from backend.sglang.kernels.triton.split_k import SplitConfig, split_k_linear

    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(rows, in_features, dtype=dtype, seed=31)
        weight = _randn(out_features, in_features, dtype=dtype, seed=32)
        residual = _randn(rows, out_features, dtype=dtype, seed=33)
        norm_weight = _randn(out_features, dtype=dtype, seed=34)
        exact = x.double() @ weight.double().t()
        for config in (SplitConfig(16, 16, 16, 4, 4), SplitConfig(16, 32, 32, 3, 4)):
            split = split_k_linear(x, weight, config)
            assert split.partials.dtype == torch.float32 and split.shape == (rows, out_features)
            assert split.partials.shape[0] > 1
            torch.testing.assert_close(split.partials.sum(0).double(), exact, atol=1e-3,
                                       rtol=1e-4)
            out, new_residual = fused_add_rms_norm(split, residual, norm_weight, EPS)
            ref_out, ref_residual = torch_ops.fused_add_rms_norm(split, residual, norm_weight,
                                                                 EPS)
            _close(out, ref_out)
            _close(new_residual, ref_residual)
            assert torch.equal(torch_ops.dense(split), split.total())


def test_measured_choice_keeps_the_library_on_a_near_tie() -> None:
    """The start-up choices (GEMV, split-K) take a kernel only when it beats the library's
    own call (None) by the margin asked for."""
    from backend.sglang.kernels.triton.timing import fastest

    assert fastest({None: 10.0, "a": 8.0, "b": 9.0}, 0.1) == "a"
    assert fastest({None: 10.0, "a": 9.5}, 0.1) is None
    assert fastest({None: 10.0, "a": 9.5}, 0.01) == "a"
    assert fastest({None: 7.0, "a": 8.0}, 0.0) is None


def test_timing_copies_make_the_weights_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start-up timing cycles through copies of the weight that add up to STREAM_BYTES
    (more than a card's L2), each its own memory with the same values; a weight that large
    already is used alone."""
    from backend.sglang.kernels.triton import timing

    monkeypatch.setattr(timing, "STREAM_BYTES", 4096)
    small = _randn(16, 16, dtype=torch.bfloat16, seed=43)  # 512 bytes
    copies = timing.weight_copies(small)
    assert len(copies) == 8 and copies[0] is small
    assert len({c.data_ptr() for c in copies}) == 8
    assert all(torch.equal(c, small) for c in copies)
    monkeypatch.setattr(timing, "MAX_COPIES", 5)
    assert len(timing.weight_copies(small)) == 5
    large = _randn(64, 64, dtype=torch.bfloat16, seed=44)  # 8 KiB
    alone = timing.weight_copies(large)
    assert len(alone) == 1 and alone[0] is large


def test_linear_into_norm_stays_plain_off_cuda(ops: ModuleType) -> None:
    """On the CPU (and for float32, or rows past the limit) the triton set's
    `linear_into_norm` is the plain matmul: split-K is only chosen by measuring on a GPU."""
    x = _randn(3, 64, dtype=torch.bfloat16, seed=41)
    weight = _randn(32, 64, dtype=torch.bfloat16, seed=42)
    result = ops.linear_into_norm(x, weight, None)
    assert isinstance(result, torch.Tensor)
    assert torch.equal(result, torch_ops.linear(x, weight, None))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_into_a_buffer_is_the_same_matmul(bias: bool) -> None:
    """`linear(..., out=)` (a decode graph's LM head writing into its static logits) gives
    bit for bit what the plain call returns, in the buffer it was given."""
    x = _randn(5, 48, dtype=torch.float32, seed=21)
    weight = _randn(40, 48, dtype=torch.float32, seed=22)
    b = _randn(40, dtype=torch.float32, seed=23) if bias else None
    buffer = torch.full((8, 40), float("nan"))
    result = torch_ops.linear(x, weight, b, out=buffer[:5])
    assert result.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:5], torch_ops.linear(x, weight, b))
    assert buffer[5:].isnan().all()


def _cascade_case() -> tuple[list[list[int]], list[int]]:
    """Slot lists of a decode batch with groups sharing prefixes, and the prefix each group
    really shares: rows 0-3 (row 3 shares only 50 of the 70), row 4 alone, rows 5-22 (18
    rows: groups of 16 and 2), rows 23-24 (alike at the key position, not before it)."""
    rng = random.Random(11)
    free = list(range(1, 2000))
    rng.shuffle(free)

    def take(n: int) -> list[int]:
        out = free[:n]
        del free[:n]
        return out

    a, b = take(70), take(40)
    lists = [a + take(n) for n in (1, 5, 13)] + [a[:50] + take(9), take(30)]
    lists += [b + take(1 + i % 7) for i in range(18)]
    c = take(33)
    lists += [c, c[:3] + take(1) + c[4:28] + take(2)]
    return lists, [50, 40, 40, 3]


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "dtype", "num_splits"), [
    (4, 2, 64, torch.float32, 1), (3, 1, 80, torch.float32, 3), (4, 2, 128, torch.bfloat16, 2),
])
def test_cascade_decode_attention_matches_reference(
    ops: ModuleType, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
    num_splits: int,
) -> None:
    from backend.cascade import plan_cascade
    from backend.sglang.kernels.triton.cascade_attention import (
        cascade_decode_attention,
        measure_shared_prefixes,
    )

    lists, shared = _cascade_case()
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    batch = build_forward_batch([[1]] * len(lists), [len(s) - 1 for s in lists], lists,
                                [True] * len(lists), CPU)
    cascade = torch.tensor(plan, dtype=torch.int64).view(4, -1)
    k_pool, v_pool = _pools(2000, kv_heads, head_dim, dtype)
    q = _randn(len(lists), q_heads, head_dim, dtype=dtype, seed=9)
    measure_shared_prefixes(batch.kv_indptr, batch.kv_indices, cascade)
    assert cascade[3, : len(shared)].tolist() == shared
    assert cascade[2].tolist()[:5] == [4, 16, 2, 2, 0]
    scale = head_dim**-0.5
    out = cascade_decode_attention(q, k_pool, v_pool, batch.kv_indptr, batch.kv_indices,
                                   cascade, scale, num_splits, 3, block_n=16)
    expected = torch_ops.paged_attention(q, k_pool, v_pool, batch, scale, kv_heads)
    _close(out, expected)
    # through the kernel set, with the plan on the batch
    with_plan = dataclasses.replace(
        batch, cascade=torch.tensor(plan, dtype=torch.int64).view(4, -1))
    ops.prepare_attention(with_plan)
    _close(ops.paged_attention(q, k_pool, v_pool, with_plan, scale, kv_heads), expected)


def test_mixed_batch_sends_its_one_token_requests_to_the_decode_kernel(ops: ModuleType) -> None:
    """single_rows names the one-token requests of a mixed batch (request, token row); the
    decode kernel attends them (split, for the long one) and the extend kernel the rest."""
    prefix_lens, extend_lens = [300, 0, 40, 9], [1, 7, 1, 3]
    batch = _batch(prefix_lens, extend_lens, 400)
    assert batch.single_rows is not None
    assert batch.single_rows.tolist() == [[0, 2], [0, 8]]
    k_pool, v_pool = _pools(400, 2, 64, torch.float32)
    q = _randn(batch.num_tokens, 4, 64, dtype=torch.float32, seed=4)
    out = ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2)
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2))
    decode_only = _batch([300, 40], [1, 1], 400)
    assert decode_only.single_rows is None  # all-decode batches need no list


def test_cascade_plan_of_a_mixed_batch_covers_its_one_token_requests(ops: ModuleType) -> None:
    """Decode rows sharing prefixes next to prefill chunks: the plan indexes the one-token
    requests (single_rows order), the kernels map them to their requests of kv_indptr."""
    from backend.cascade import plan_cascade

    lists, shared = _cascade_case()
    rng = random.Random(5)
    fresh = list(range(3000, 3200))
    chunks = {3: 9, 10: 17, 26: 5}  # batch position -> a chunk of that many new tokens
    token_ids, prefix_lens, slot_lists = [], [], []
    decodes = iter(lists)
    for position in range(len(lists) + len(chunks)):
        if position in chunks:
            n = chunks[position]
            prefix = rng.randint(0, 20)
            slot_lists.append(fresh[: prefix + n])
            del fresh[: prefix + n]
            token_ids.append([1] * n)
            prefix_lens.append(prefix)
        else:
            slots = next(decodes)
            slot_lists.append(slots)
            token_ids.append([1])
            prefix_lens.append(len(slots) - 1)
    batch = build_forward_batch(token_ids, prefix_lens, slot_lists, [True] * len(token_ids), CPU)
    assert batch.single_rows is not None and batch.single_rows.shape[1] == len(lists)
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    padded = aligned_plan(plan)  # the engine's layout: rows padded to an even width
    assert len(padded) // 4 == len(lists) + len(lists) % 2
    batch = dataclasses.replace(batch, cascade=plan_view(torch.tensor(padded), len(lists)))
    k_pool, v_pool = _pools(3200, 2, 64, torch.float32)
    q = _randn(batch.num_tokens, 4, 64, dtype=torch.float32, seed=6)
    ops.prepare_attention(batch)
    assert batch.cascade is not None and batch.cascade[3, : len(shared)].tolist() == shared
    out = ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2)
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2))


# --- K/V in 8 bits (KV_CACHE_DTYPE=fp8_e4m3) ---------------------------------------------


@pytest.mark.parametrize("input_dtype", DTYPES)
def test_store_kv_into_fp8_rounds_as_torch_does(ops: ModuleType, input_dtype: torch.dtype
                                                ) -> None:
    """Nearest e4m3 value, ties to even, saturating at ±448: the same bits as torch's cast."""
    pools = [KVPool(1, 12, 2, 80, KV_FP8, CPU) for _ in range(2)]
    kv = _randn(4, 2 * 2 * 80, dtype=input_dtype) * 200  # some beyond ±448, some subnormal
    k = kv[:, : 2 * 80].view(4, 2, 80)
    v = kv[:, 2 * 80 :].view(4, 2, 80)
    slots = torch.tensor([9, 2, 11, 5])
    ops.store_kv(pools[0].k[0], pools[0].v[0], slots, k, v)
    pools[1].store(0, slots, k, v)
    for mine, theirs in ((pools[0].k[0], pools[1].k[0]), (pools[0].v[0], pools[1].v[0])):
        assert mine.dtype == KV_FP8
        assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8))
    assert pools[0].k[0].float().abs().max() == 448  # saturated, not NaN


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_prepare_into_fp8_pools(ops: ModuleType, dtype: torch.dtype) -> None:
    """The fused kernel's K/V stores into an 8-bit pool match the torch ops' (bit for bit in
    float32; within one e4m3 step in bfloat16, where the interpreter's own bfloat16 rounding
    of K can differ from torch's)."""
    num_tokens, q_heads, kv_heads, head_dim = 5, 4, 2, 64
    cache = ops.build_rope_cache(head_dim, 64, 10000.0, None, CPU)
    qkv = _randn(num_tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype) * 3
    norm = _randn(head_dim, dtype=dtype, seed=1)
    positions = torch.tensor([0, 7, 3, 63, 12])
    slots = torch.tensor([9, 2, 11, 5, 1])
    pools = [KVPool(1, 12, kv_heads, head_dim, KV_FP8, CPU) for _ in range(2)]
    for kernels, pool in ((ops, pools[0]), (torch_ops, pools[1])):
        kernels.qkv_prepare(qkv, q_heads, kv_heads, positions, cache, norm, norm, EPS,
                            pool.k[0], pool.v[0], slots)
    assert torch.equal(pools[0].v[0].view(torch.uint8), pools[1].v[0].view(torch.uint8))
    if dtype == torch.float32:
        assert torch.equal(pools[0].k[0].view(torch.uint8), pools[1].k[0].view(torch.uint8))
    else:
        torch.testing.assert_close(pools[0].k[0].float(), pools[1].k[0].float(),
                                   rtol=0.125, atol=2.0**-9)
    assert pools[0].k[0][[0, 3, 4]].float().abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("prefix_lens", "extend_lens"), [
    ([0, 70, 9], [1, 1, 1]),  # decode
    ([0, 30, 5], [17, 4, 1]),  # prefill, extend and a one-token request: a mixed batch
    ([100, 30, 5], [40, 4, 1]),  # extends over longer prefixes: the large extend tiles
])
def test_attention_over_fp8_pools(
    ops: ModuleType, dtype: torch.dtype, prefix_lens: list[int], extend_lens: list[int]
) -> None:
    """The kernels read an 8-bit pool's K/V in q's dtype: the torch reference's result."""
    num_slots = sum(prefix_lens) + sum(extend_lens) + 7
    batch = _batch(prefix_lens, extend_lens, num_slots)
    k_pool, v_pool = (pool.mul(4).to(KV_FP8) for pool in _pools(num_slots, 2, 64, dtype))
    q = _randn(batch.num_tokens, 4, 64, dtype=dtype, seed=7)
    out = ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2)
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2))


def test_cascade_attention_over_fp8_pools(ops: ModuleType) -> None:
    from backend.cascade import plan_cascade

    lists, _ = _cascade_case()
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    batch = build_forward_batch([[1]] * len(lists), [len(s) - 1 for s in lists], lists,
                                [True] * len(lists), CPU)
    batch = dataclasses.replace(batch, cascade=torch.tensor(plan, dtype=torch.int64).view(4, -1))
    k_pool, v_pool = (pool.to(KV_FP8) for pool in _pools(2000, 2, 64, torch.bfloat16))
    q = _randn(len(lists), 4, 64, dtype=torch.bfloat16, seed=9)
    ops.prepare_attention(batch)
    out = ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2)
    _close(out, torch_ops.paged_attention(q, k_pool, v_pool, batch, 0.125, 2))
