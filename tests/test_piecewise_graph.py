"""Piecewise graphs' buckets and buffer flow: the pieces, run eagerly on their static buffers
(the CUDA graphs replay exactly these launches), give the plain forward's logits and K/V."""

from __future__ import annotations

import pytest
import torch

from backend.batch import ForwardBatch, build_forward_batch
from backend.kv_pool import KVPool
from backend.sglang.piecewise_graph import PiecewiseGraphRunner, token_buckets
from backend.sglang.runner import NativeRunner

CPU = torch.device("cpu")


def test_token_buckets() -> None:
    fine = [256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert token_buckets(8192) == fine + list(range(2560, 8193, 512))
    assert token_buckets(2300) == fine + [2300]
    assert token_buckets(100) == [100]
    with pytest.raises(ValueError):
        token_buckets(0)


def _snapshot(pool: KVPool) -> list[torch.Tensor]:
    return [t.clone() for t in pool.k + pool.v]


def _restore(pool: KVPool, saved: list[torch.Tensor]) -> None:
    for tensor, copy in zip(pool.k + pool.v, saved):
        tensor.copy_(copy)


@pytest.mark.parametrize(("kernel_set", "max_tokens"), [("torch", 300), ("triton", 64)])
def test_pieces_match_the_plain_forward(tiny_model_factory, kernel_set: str,
                                        max_tokens: int) -> None:
    """A mixed batch (a request decoding over a cached prefix next to a prefill chunk over
    another prefix), then a smaller one in the same bucket (the padding rows must not write
    the first batch's slots again), then one of the larger bucket: logits and every live K/V
    slot as the plain forward's (the interpreted triton set: the first two only). Decode
    batches are not the pieces' (they have their own graphs)."""
    from transformers import AutoConfig

    if kernel_set == "triton":
        pytest.importorskip("triton")
    path = tiny_model_factory("qwen3")
    runner = NativeRunner(path, AutoConfig.from_pretrained(path), dtype=torch.float32,
                          device=CPU, num_kv_slots=1024, kernel_set=kernel_set)
    pieces = PiecewiseGraphRunner(runner.model, runner.kv_pool, max_tokens=max_tokens,
                                  dtype=torch.float32, device=CPU, graphs=False)
    assert pieces.buckets == ([256, 300] if max_tokens == 300 else [64])
    generator = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 500, (n,), generator=generator).tolist()

    prefixes = [tokens(20), tokens(12)]
    slots = [list(range(1, 21)), list(range(30, 42))]
    with torch.inference_mode():
        runner.forward(build_forward_batch(prefixes, [0, 0], slots, [False, False], CPU))
    batches: list[ForwardBatch] = [
        build_forward_batch([tokens(1), tokens(30)], [20, 12],
                            [slots[0] + [21], slots[1] + list(range(42, 72))], [True, True], CPU),
        build_forward_batch([tokens(1), tokens(5)], [21, 42],
                            [slots[0] + [21, 22], slots[1] + list(range(42, 77))],
                            [True, False], CPU),
    ]
    if max_tokens >= 272:  # the larger bucket
        batches.append(build_forward_batch([tokens(1), tokens(270)], [22, 0],
                                           [slots[0] + [21, 22, 23], list(range(400, 670))],
                                           [True, True], CPU))
    for batch in batches:
        before = _snapshot(runner.kv_pool)
        with torch.inference_mode():
            expected = runner.model(batch.input_ids, batch.positions, batch, runner.kv_pool)
            expected_kv = _snapshot(runner.kv_pool)
            _restore(runner.kv_pool, before)
            assert pieces.can_run(batch)
            got = pieces.run(batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(_snapshot(runner.kv_pool), expected_kv):
            torch.testing.assert_close(mine[1:], theirs[1:], rtol=1e-6, atol=1e-6)  # not slot 0
    assert pieces.num_runs == len(batches)
    too_big = build_forward_batch([tokens(max_tokens + 1)], [0],
                                  [list(range(400, 401 + max_tokens))], [True], CPU)
    decode = build_forward_batch([tokens(1)], [23], [slots[0] + [21, 22, 23, 24]], [True], CPU)
    assert not pieces.can_run(too_big) and not pieces.can_run(decode)
