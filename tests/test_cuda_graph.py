"""CUDA graphs for decode: buckets and padding (CPU, Triton interpreter), and graph replay
against eager decode (CUDA only)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from transformers import AutoConfig, PretrainedConfig, Qwen3Config  # noqa: E402

from backend.batch import (  # noqa: E402
    ForwardBatch,
    aligned_plan,
    build_forward_batch,
    plan_view,
)
from backend.sglang.cuda_graph import (  # noqa: E402
    StaticDecodeInputs,
    batch_size_buckets,
    choose_bucket,
    kv_index_capacity,
)
from backend.sglang.runner import NativeRunner  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parent.parent
SLOTS_PER_REQUEST = 64


def _tiny_qwen3(vocab_size: int = 256) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, eos_token_id=2, architectures=["Qwen3ForCausalLM"],
    )


def _slots(request: int, length: int) -> list[int]:
    start = 1 + request * SLOTS_PER_REQUEST
    return list(range(start, start + length))


def _batch(tokens: list[list[int]], prefix_lens: list[int]) -> ForwardBatch:
    slots = [_slots(r, p + len(t)) for r, (t, p) in enumerate(zip(tokens, prefix_lens))]
    return build_forward_batch(tokens, prefix_lens, slots, [True] * len(tokens), DEVICE)


# ------------------------------------------------------------------ buckets


def test_buckets_double_to_eight_then_step_by_sixteen() -> None:
    assert batch_size_buckets(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert batch_size_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_size_buckets(3) == [1, 2, 3]
    assert batch_size_buckets(1) == [1]
    with pytest.raises(ValueError):
        batch_size_buckets(0)


def test_choose_bucket_takes_the_smallest_that_fits() -> None:
    buckets = batch_size_buckets(64)
    assert [choose_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 64)] == [
        1, 2, 4, 8, 8, 16, 16, 32, 64,
    ]
    assert choose_bucket(buckets, 65) is None
    assert choose_bucket([16, 32], 3) == 16  # small buckets left out by the time budget


def test_kv_index_capacity_is_capped_by_the_pool() -> None:
    assert kv_index_capacity(8, 100, 10_000) == 8 * 100 + 8
    assert kv_index_capacity(256, 40_960, 1_000) == 4 * 1_000 + 256


# ------------------------------------------------------------------ padding


def test_live_batch_is_padded_into_static_buffers() -> None:
    batch = _batch([[7], [8], [9]], [4, 0, 2])
    inputs = StaticDecodeInputs.allocate(8, 40, DEVICE)
    for buffer in (inputs.input_ids, inputs.positions, inputs.out_slots, inputs.kv_indptr,
                   inputs.kv_indices):
        buffer.fill_(99)  # left over from an earlier, larger batch
    assert inputs.fits(batch, 4)
    inputs.load(batch, 4)

    assert inputs.input_ids[:4].tolist() == [7, 8, 9, 0]
    assert inputs.positions[:4].tolist() == [4, 0, 2, 0]
    assert inputs.out_slots[:4].tolist() == [5, 65, 131, 0]
    assert inputs.kv_indptr[:5].tolist() == [0, 5, 6, 9, 10]
    live = _slots(0, 5) + _slots(1, 1) + _slots(2, 3)
    assert inputs.kv_indices[:10].tolist() == live + [0]
    assert inputs.input_ids[4:].tolist() == [99] * 4  # rows past the bucket untouched


def test_batch_view_describes_the_capacity() -> None:
    inputs = StaticDecodeInputs.allocate(16, 100, DEVICE)
    view = inputs.batch_view(4, 4096)
    assert view.batch_size == 4 and view.is_decode
    assert view.seq_lens == [4096] * 4
    assert view.logits_indices.tolist() == [0, 1, 2, 3]
    assert view.qo_indptr.tolist() == [0, 1, 2, 3, 4]
    assert view.kv_indices.data_ptr() == inputs.kv_indices.data_ptr()


def test_too_many_kv_indices_do_not_fit() -> None:
    batch = _batch([[1], [2]], [29, 29])
    inputs = StaticDecodeInputs.allocate(4, 60, DEVICE)
    assert inputs.fits(batch, 2)
    assert not inputs.fits(batch, 4)  # 60 entries plus two padding rows


def test_padded_static_forward_matches_eager_and_touches_only_slot_zero(tmp_path: Path) -> None:
    """What a graph replays: the model over the padded static batch whose host lists say
    every request is at full context. Live rows must equal the eager forward, and padding
    rows may write nowhere but the padding slot."""
    config = _tiny_qwen3()
    runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=DEVICE,
                          num_kv_slots=256, load_format="dummy", seed=0, kernel_set="triton")
    prompts = [[5, 9, 3, 7, 1], [11, 12], [20, 21, 22, 23, 24, 25, 26]]
    runner.forward(_batch(prompts, [0, 0, 0]))
    decode = _batch([[40], [41], [42]], [len(p) for p in prompts])
    before = [k.clone() for k in runner.kv_pool.k]

    inputs = StaticDecodeInputs.allocate(8, 512, DEVICE)
    inputs.load(decode, 8)
    view = inputs.batch_view(8, runner.info.max_context_len)
    with torch.inference_mode():
        padded = runner.model(view.input_ids, view.positions, view, runner.kv_pool)
    written = {int(s) for s in decode.out_slots.tolist()} | {0}
    for layer, k in enumerate(runner.kv_pool.k):
        changed = (k != before[layer]).flatten(1).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) <= written
    assert torch.isfinite(padded).all()

    eager = runner.forward(decode)
    torch.testing.assert_close(padded[:3], eager, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ CUDA graphs


@dataclass
class _Session:
    """A few requests prefilled, then decoded step by step on one runner."""

    runner: NativeRunner
    lengths: list[int]

    @classmethod
    def start(cls, runner: NativeRunner, prompts: list[list[int]]) -> tuple[_Session, torch.Tensor]:
        logits = runner.forward(_batch(prompts, [0] * len(prompts))).clone()
        return cls(runner, [len(p) for p in prompts]), logits

    def step(self, tokens: list[int]) -> torch.Tensor:
        logits = self.runner.forward(_batch([[t] for t in tokens], self.lengths)).clone()
        self.lengths = [n + 1 for n in self.lengths]
        return logits


def _prompts(batch_size: int, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch_size)
    return [torch.randint(3, vocab_size, (3 + 5 * b % 17,), generator=generator).tolist()
            for b in range(batch_size)]


def _assert_same_decode(eager: NativeRunner, graphed: NativeRunner, batch_size: int,
                        steps: int, tolerance: float) -> None:
    """Teacher-forced on the eager greedy tokens: logits close, and the same greedy token
    wherever the eager top two differ by more than the tolerance."""
    prompts = _prompts(batch_size, eager.info.vocab_size)
    eager_session, eager_logits = _Session.start(eager, prompts)
    graph_session, graph_logits = _Session.start(graphed, prompts)
    replays = graphed.cuda_graphs.num_replays if graphed.cuda_graphs else 0
    for _ in range(steps):
        tokens = eager_logits.argmax(dim=-1)
        top2 = eager_logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
        assert torch.equal(graph_logits.argmax(dim=-1)[clear], tokens[clear])
        eager_logits = eager_session.step(tokens.tolist())
        graph_logits = graph_session.step(tokens.tolist())
        torch.testing.assert_close(graph_logits, eager_logits, atol=tolerance, rtol=tolerance)
    assert graphed.cuda_graphs is not None
    assert graphed.cuda_graphs.num_replays == replays + steps


def _runner_pair(folder: Path, config: PretrainedConfig, dtype: torch.dtype,
                 max_bs: int) -> tuple[NativeRunner, NativeRunner]:
    def build(graphs: bool) -> NativeRunner:
        return NativeRunner(str(folder), config, dtype=dtype, device=DEVICE, num_kv_slots=2048,
                            load_format="dummy", seed=0, kernel_set="triton",
                            cuda_graph=graphs, cuda_graph_max_bs=max_bs)

    return build(False), build(True)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_qwen3_graph_decode_matches_eager(tmp_path: Path, dtype: torch.dtype) -> None:
    eager, graphed = _runner_pair(tmp_path, _tiny_qwen3(), dtype, max_bs=24)
    assert graphed.cuda_graphs is not None
    assert graphed.cuda_graphs.buckets == [1, 2, 4, 8, 16, 24]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for batch_size in (1, 3, 4, 5, 16, 17):  # exact buckets and padded ones
        _assert_same_decode(eager, graphed, batch_size, steps=6, tolerance=tolerance)


@needs_cuda
def test_tiny_qwen3_free_running_greedy_tokens_match_in_float32(tmp_path: Path) -> None:
    eager, graphed = _runner_pair(tmp_path, _tiny_qwen3(), torch.float32, max_bs=8)
    prompts = _prompts(5, eager.info.vocab_size)
    outputs = []
    for runner in (eager, graphed):
        session, logits = _Session.start(runner, prompts)
        tokens = [logits.argmax(dim=-1).tolist()]
        for _ in range(10):
            tokens.append(session.step(tokens[-1]).argmax(dim=-1).tolist())
        outputs.append(tokens)
    assert outputs[0] == outputs[1]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piecewise_graphs_match_eager_prefill_and_mixed_steps(tmp_path: Path,
                                                              dtype: torch.dtype) -> None:
    """PIECEWISE_CUDA_GRAPH beside the decode graphs: a prefill, decodes beside a chunk (both
    in the 256-token bucket, the second padded) and a 270-token prefill (the 300 bucket) give
    the eager runner's logits and K/V; decode steps replay the decode graphs."""
    config = _tiny_qwen3()

    def build(tokens: int) -> NativeRunner:
        return NativeRunner(str(tmp_path), config, dtype=dtype, device=DEVICE,
                            num_kv_slots=2048, load_format="dummy", seed=0,
                            kernel_set="triton", cuda_graph=tokens > 0, cuda_graph_max_bs=8,
                            piecewise_graph_tokens=tokens)

    eager, graphed = build(0), build(300)
    assert graphed.piecewise is not None and sorted(graphed.piecewise.graphs) == [256, 300]
    assert graphed.cuda_graphs is not None
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    generator = torch.Generator().manual_seed(7)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, config.vocab_size, (n,), generator=generator).tolist()

    prompts = [tokens(60) for _ in range(3)]
    steps = [
        _batch([p[:40] for p in prompts], [0, 0, 0]),  # prefill
        _batch([[5], prompts[1][40:], [7]], [40, 40, 40]),  # two decodes beside a chunk
        _batch([[6], [8], [9]], [41, 60, 41]),  # decode: the decode graphs
        _batch([[4], [3], [2]] + [tokens(45) for _ in range(6)], [42, 61, 42] + [0] * 6),
    ]
    for batch in steps:
        expected = eager.forward(batch).clone()
        got = graphed.forward(batch)
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    assert graphed.piecewise.num_runs == 3 and graphed.cuda_graphs.num_replays == 1
    for mine, theirs in zip(graphed.kv_pool.k + graphed.kv_pool.v,
                            eager.kv_pool.k + eager.kv_pool.v):
        torch.testing.assert_close(mine[1:], theirs[1:], atol=tolerance, rtol=tolerance)


@needs_cuda
def test_larger_batches_and_prefill_run_eagerly(tmp_path: Path) -> None:
    eager, graphed = _runner_pair(tmp_path, _tiny_qwen3(), torch.float32, max_bs=4)
    assert graphed.cuda_graphs is not None
    prompts = _prompts(6, eager.info.vocab_size)
    _Session.start(graphed, prompts)
    decode = _batch([[1]] * 6, [len(p) for p in prompts])
    assert not graphed.cuda_graphs.can_run(decode)
    assert graphed.cuda_graphs.num_replays == 0


@needs_cuda
def test_dummy_qwen3_0_6b_graph_decode_matches_eager(tmp_path: Path) -> None:
    config = AutoConfig.from_pretrained(REPO / "model_configs" / "qwen3-0.6b")
    eager, graphed = _runner_pair(tmp_path, config, torch.bfloat16, max_bs=8)
    for batch_size in (1, 3, 8):
        _assert_same_decode(eager, graphed, batch_size, steps=4, tolerance=0.1)


def test_cascade_plan_is_padded_and_the_static_forward_matches_eager(tmp_path: Path) -> None:
    """Three requests sharing a 20-token prefix decode through the padded static batch with
    its cascade plan (what the cascade graph replays): the plan is copied with the padding
    rows in no group, and the live rows equal the eager forward without a plan."""
    from backend.cascade import plan_cascade

    config = _tiny_qwen3()
    runner = NativeRunner(str(tmp_path), config, dtype=torch.float32, device=DEVICE,
                          num_kv_slots=256, load_format="dummy", seed=0, kernel_set="triton",
                          cascade_attention=True)
    assert runner.cascade_attention
    shared = list(range(1, 21))
    own = [[30, 31, 32], [40, 41], [50, 51, 52, 53]]
    prefill_slots = [shared + o for o in own]
    runner.forward(build_forward_batch([list(range(5, 25)) + [7] * len(o) for o in own[:1]],
                                       [0], prefill_slots[:1], [True], DEVICE))
    runner.forward(build_forward_batch([[8] * len(o) for o in own[1:]], [20, 20],
                                       prefill_slots[1:], [True, True], DEVICE))
    decode_slots = [s + [60 + i] for i, s in enumerate(prefill_slots)]
    plan = plan_cascade(decode_slots, min_prefix=16)
    assert plan is not None
    decode = build_forward_batch([[40], [41], [42]], [len(s) for s in prefill_slots],
                                 decode_slots, [True] * 3, DEVICE)
    eager = runner.forward(decode).clone()

    inputs = StaticDecodeInputs.allocate(8, 512, DEVICE)
    inputs.cascade.fill_(99)  # left over from an earlier batch
    padded = aligned_plan(plan)  # 3 rows: each plan row padded to 4, as the engine sends it
    live = dataclasses.replace(decode, cascade=plan_view(torch.tensor(padded, device=DEVICE), 3))
    inputs.load(live, 8, cascade=True)
    assert inputs.cascade[0, :8].tolist() == [0, 0, 0, -1, -1, -1, -1, -1]
    assert inputs.cascade[2, :8].tolist() == [3, 0, 0, 0, 0, 0, 0, 0]
    view = inputs.batch_view(8, runner.info.max_context_len, cascade=True)
    with torch.inference_mode():
        padded = runner.model(view.input_ids, view.positions, view, runner.kv_pool)
    assert inputs.cascade[3, 0].item() == 20  # measured on the device
    torch.testing.assert_close(padded[:3], eager, atol=1e-4, rtol=1e-4)

    inputs.load(decode, 8, cascade=True)  # a batch without a plan: no group at all
    assert inputs.cascade[0, :8].tolist() == [-1] * 8
    assert inputs.cascade[2, :8].tolist() == [0] * 8
