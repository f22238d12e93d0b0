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
    assert token_buckets(8192) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                                   3072, 4096, 5120, 6144, 7168, 8192]
    assert token_buckets(2560) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560]
    assert token_buckets(100) == [100]
    with pytest.raises(ValueError):
        token_buckets(0)


def _snapshot(pool: KVPool) -> list[torch.Tensor]:
    return [t.clone() for t in pool.k + pool.v]


def _restore(pool: KVPool, saved: list[torch.Tensor]) -> None:
    for tensor, copy in zip(pool.k + pool.v, saved):
        tensor.copy_(copy)


def test_pieces_match_the_plain_forward(tiny_model_factory) -> None:
    """A mixed batch (a request decoding over a cached prefix next to a prefill chunk over
    another prefix), then a smaller one in the same bucket (the padding rows must not write
    the first batch's slots again): logits and every live K/V slot as the plain forward's."""
    from transformers import AutoConfig

    path = tiny_model_factory("qwen3")
    runner = NativeRunner(path, AutoConfig.from_pretrained(path), dtype=torch.float32,
                          device=CPU, num_kv_slots=256, kernel_set="torch")
    pieces = PiecewiseGraphRunner(runner.model, runner.kv_pool, max_tokens=64,
                                  dtype=torch.float32, device=CPU, graphs=False)
    assert pieces.buckets == [64]
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
    assert pieces.num_runs == 2
    too_big = build_forward_batch([tokens(65)], [0], [list(range(100, 165))], [True], CPU)
    assert not pieces.can_run(too_big)
