"""Batched sampler: greedy, filters, penalties, seeded determinism, distribution, logprobs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch

from engine.sampler import RequestHistory, Sampler, apply_penalties
from engine.sampling_params import SamplingParams

VOCAB = 512
CPU = torch.device("cpu")


def make_sampler(seed: int = 0, vocab: int = VOCAB) -> Sampler:
    return Sampler(vocab_size=vocab, device=CPU, seed=seed)


def histories_for(
    params: list[SamplingParams], prompt: list[int] | None = None
) -> list[RequestHistory]:
    return [RequestHistory(prompt or [1, 2, 3], seed=p.seed) for p in params]


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_equals_argmax() -> None:
    logits = random_logits(8)
    params = [SamplingParams(temperature=0.0) for _ in range(8)]
    out = make_sampler().sample(logits, params, histories_for(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-38, 1e-45])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    """Dividing the logits by it would overflow to inf and NaN; it samples the argmax."""
    logits = random_logits(8, seed=3)
    params = [SamplingParams(temperature=temperature, top_p=0.9) for _ in range(8)]
    params[0].validate()
    out = make_sampler().sample(logits, params, histories_for(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_rows_equal_argmax_in_a_mixed_batch() -> None:
    logits = random_logits(6)
    params = [
        SamplingParams(temperature=0.0 if row % 2 == 0 else 1.5, top_p=0.9, top_k=50)
        for row in range(6)
    ]
    out = make_sampler().sample(logits, params, histories_for(params))
    expected = logits.argmax(dim=-1).tolist()
    assert [out.token_ids[row] for row in (0, 2, 4)] == [expected[row] for row in (0, 2, 4)]


@pytest.mark.parametrize("rows", [
    [SamplingParams(temperature=0.0)] * 4,
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=True,
                                                     top_logprobs=3)] * 2,
    [SamplingParams(temperature=0.0, repetition_penalty=1.4)] * 4,
    [SamplingParams(temperature=0.8, top_p=0.9, seed=row) for row in range(4)],
], ids=["greedy", "logprobs", "penalties", "sampled"])
def test_half_precision_logits_sample_as_their_float32_widening(
        rows: list[SamplingParams]) -> None:
    """bfloat16 logits (a CUDA runner's) give exactly what their float32 copy gives: a
    greedy batch takes the argmax in bfloat16 (ties included: bfloat16 rounds many), the
    rest are widened first."""
    logits = random_logits(4, seed=5).bfloat16()
    logits[:, [20, 10]] = logits.amax() + 1  # a tie at the top of every row, broken alike
    half = make_sampler().sample(logits, rows, histories_for(rows, prompt=[7, 9]))
    wide = make_sampler().sample(logits.float(), rows, histories_for(rows, prompt=[7, 9]))
    assert half == wide


def test_sampler_does_not_modify_the_logits() -> None:
    logits = random_logits(4)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3)
        for _ in range(4)
    ]
    make_sampler().sample(logits, params, histories_for(params))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 2.0])
def test_top_k_one_equals_greedy(temperature: float) -> None:
    logits = random_logits(16, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1) for _ in range(16)]
    for step in range(3):
        out = make_sampler(seed=step).sample(logits, params, histories_for(params))
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_picks_the_argmax() -> None:
    logits = random_logits(16, seed=2)
    params = [SamplingParams(temperature=2.0, top_p=1e-6) for _ in range(16)]
    out = make_sampler().sample(logits, params, histories_for(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    probs = torch.tensor([0.40, 0.25, 0.19, 0.10, 0.06])
    rows = 2000
    logits = probs.log().expand(rows, -1).contiguous()
    params = [SamplingParams(min_p=0.5) for _ in range(rows)]
    out = make_sampler(vocab=5).sample(logits, params, histories_for(params))
    assert set(out.token_ids) == {0, 1}
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    kept = torch.tensor([0.40, 0.25, 0.0, 0.0, 0.0]) / 0.65
    assert chi_square(counts[:2], kept[:2]) < 16.3


def test_penalties_follow_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    history = RequestHistory([0, 1])
    for token in (3, 3, 4):
        history.append(token)
    penalized = apply_penalties(logits, params, [history])
    # repetition on prompt + output: positive / 2, negative * 2;
    # presence 0.5 and frequency 0.25 * count on output tokens only.
    expected = torch.tensor([[1.0, -2.0, 0.5, 1.5 - 0.5 - 0.5, -4.0 - 0.5 - 0.25, 1.0]])
    torch.testing.assert_close(penalized, expected)


def test_each_penalty_alone() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    history = RequestHistory([0])
    for token in (3, 3, 3, 1):
        history.append(token)
    cases = [
        (SamplingParams(repetition_penalty=0.5), [4.0, -0.5, 0.5, 6.0]),
        (SamplingParams(presence_penalty=-1.0), [2.0, 0.0, 0.5, 4.0]),
        (SamplingParams(frequency_penalty=1.0), [2.0, -2.0, 0.5, 0.0]),
    ]
    for params, expected in cases:
        torch.testing.assert_close(
            apply_penalties(logits, [params], [history]), torch.tensor([expected])
        )


def test_penalties_only_touch_their_rows_and_change_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0], [0.0, 3.0, 2.9, 1.0]])
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.0),
    ]
    histories = histories_for(params, prompt=[1])
    out = make_sampler(vocab=4).sample(logits, params, histories)
    assert out.token_ids == [2, 1]
    penalized = apply_penalties(logits, params, histories)
    torch.testing.assert_close(penalized[1], logits[1])
    torch.testing.assert_close(penalized[0], torch.tensor([0.0, 2.0, 2.9, 1.0]))


def run_seeded(
    params: list[SamplingParams], logits_per_step: list[torch.Tensor], watched: int
) -> list[int]:
    """Tokens of row `watched` over several steps, appending each to its history."""
    sampler = make_sampler(seed=99)
    histories = histories_for(params)
    tokens = []
    for logits in logits_per_step:
        out = sampler.sample(logits, params, histories)
        for history, token in zip(histories, out.token_ids, strict=True):
            history.append(token)
        tokens.append(out.token_ids[watched])
    return tokens


def test_seeded_row_is_independent_of_the_batch() -> None:
    steps = 8
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    row_logits = [random_logits(1, seed=100 + step)[0] for step in range(steps)]
    alone = run_seeded([seeded], [row.unsqueeze(0) for row in row_logits], watched=0)

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=7, min_p=0.05),
        SamplingParams(temperature=0.5, top_p=0.5, seed=7),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.5),
    ]
    for position in (0, 2, 4):
        batch_params = others[:position] + [seeded] + others[position:]
        batch_logits = []
        for step, row in enumerate(row_logits):
            noise = random_logits(len(batch_params), seed=500 + step)
            noise[position] = row
            batch_logits.append(noise)
        assert run_seeded(batch_params, batch_logits, watched=position) == alone


def test_different_seeds_give_different_tokens() -> None:
    steps = 20
    logits = [torch.zeros(1, VOCAB) for _ in range(steps)]
    first = run_seeded([SamplingParams(seed=1)], logits, watched=0)
    again = run_seeded([SamplingParams(seed=1)], logits, watched=0)
    second = run_seeded([SamplingParams(seed=2)], logits, watched=0)
    assert first == again
    assert first != second
    # seeds that differ only past the low 32 bits (which the CPU generator keeps) differ too
    for a, b in ((0, 2**32), (1, 2**32 + 1), (-1, 2**63 - 1)):
        assert run_seeded([SamplingParams(seed=a)], logits, watched=0) != \
            run_seeded([SamplingParams(seed=b)], logits, watched=0)


def test_unseeded_rows_vary_across_steps() -> None:
    sampler = make_sampler()
    params = [SamplingParams()]
    histories = histories_for(params)
    tokens = {
        sampler.sample(torch.zeros(1, VOCAB), params, histories).token_ids[0] for _ in range(20)
    }
    assert len(tokens) > 10


DISTRIBUTION = torch.tensor([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), DISTRIBUTION),
        (SamplingParams(temperature=0.5), DISTRIBUTION**2 / (DISTRIBUTION**2).sum()),
        (SamplingParams(top_k=2), torch.tensor([0.0, 0.0, 0.3, 0.4]) / 0.7),
        (SamplingParams(top_p=0.6), torch.tensor([0.0, 0.0, 0.3, 0.4]) / 0.7),
        (SamplingParams(top_p=0.9, top_k=3), torch.tensor([0.0, 0.2, 0.3, 0.4]) / 0.9),
        # top-p applies to the distribution renormalized after top-k: 0.4 + 0.3 of 0.9.
        (SamplingParams(top_p=0.75, top_k=3), torch.tensor([0.0, 0.0, 0.3, 0.4]) / 0.7),
        (SamplingParams(min_p=0.6, top_p=0.9), torch.tensor([0.0, 0.0, 0.3, 0.4]) / 0.7),
    ],
)
def test_sampling_distribution(params: SamplingParams, expected: torch.Tensor) -> None:
    rows = 8000
    logits = DISTRIBUTION.log().expand(rows, -1).contiguous()
    batch = [params] * rows
    out = make_sampler(vocab=4).sample(logits, batch, histories_for(batch))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).float()
    support = expected > 0
    assert torch.equal(counts > 0, support)
    # 3 degrees of freedom at most: p = 0.001 is 16.27.
    assert chi_square(counts[support], expected[support]) < 16.3


def test_seeded_rows_follow_the_distribution_too() -> None:
    logits = DISTRIBUTION.log().unsqueeze(0)
    params = [SamplingParams(seed=seed) for seed in range(2000)]
    sampler = make_sampler(vocab=4)
    tokens = sampler.sample(logits.expand(2000, -1), params, histories_for(params)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    assert chi_square(counts, DISTRIBUTION) < 16.3


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(4, seed=3)
    params = [
        SamplingParams(temperature=0.0, logprobs=True, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, logprobs=True, top_logprobs=5, top_k=20),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, logprobs=True, top_logprobs=20, presence_penalty=1.0),
    ]
    out = make_sampler().sample(logits, params, histories_for(params))
    reference = torch.log_softmax(logits, dim=-1)

    assert out.logprobs is not None and out.top_logprobs is not None
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(reference[row, token].item(), abs=1e-5)
    assert [len(top) for top in out.top_logprobs] == [0, 5, 0, 20]
    for row in (1, 3):
        top = out.top_logprobs[row]
        values = [value for _, value in top]
        assert values == sorted(values, reverse=True)
        ref_values, ref_ids = reference[row].topk(len(top))
        assert [token for token, _ in top] == ref_ids.tolist()
        assert values == pytest.approx(ref_values.tolist(), abs=1e-5)
        assert math.fsum(math.exp(v) for v in values) <= 1.0 + 1e-5


def test_logprobs_without_top_logprobs() -> None:
    logits = random_logits(2, seed=4)
    params = [SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.0)]
    out = make_sampler().sample(logits, params, histories_for(params))
    assert out.top_logprobs == [[], []]
    assert out.logprobs is not None
    expected = torch.log_softmax(logits, dim=-1).amax(dim=-1).tolist()
    assert out.logprobs == pytest.approx(expected, abs=1e-6)


def test_vocab_larger_than_tokenizer_is_sampled_whole() -> None:
    logits = torch.full((1, 600), -1e4)
    logits[0, 590] = 10.0
    params = [SamplingParams(temperature=1.0, top_p=0.9)]
    out = make_sampler(vocab=600).sample(logits, params, histories_for(params))
    assert out.token_ids == [590]


def test_frequency_counts_survive_a_long_history() -> None:
    history = RequestHistory([], seed=None)
    generated = [token % 3 for token in range(100)]
    for token in generated:
        history.append(token)
    assert history.output_ids == generated
    assert history.output_array.tolist() == generated
    logits = torch.zeros(1, 4)
    penalized = apply_penalties(logits, [SamplingParams(frequency_penalty=0.5)], [history])
    torch.testing.assert_close(penalized, torch.tensor([[-17.0, -16.5, -16.5, 0.0]]))
