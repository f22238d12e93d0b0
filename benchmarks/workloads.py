"""Request generators of the benchmark workloads: pure functions of their arguments and seed.

Prompts are token ids (random ids, as in the offline benchmarks of vLLM and nano-vllm) or
chat messages (the CPU workload). The same arguments always give the same requests, so the
engine and the HF baseline see identical work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt ids and how many tokens it generates."""

    prompt_ids: list[int]
    max_new_tokens: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_ids)


def random_ids(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """`length` token ids uniform in [0, vocab_size)."""
    return [rng.randrange(vocab_size) for _ in range(length)]


def random_requests(
    num: int,
    *,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """`num` requests with input and output lengths uniform in the closed ranges given."""
    _check_range(input_range, "input_range")
    _check_range(output_range, "output_range")
    rng = random.Random(seed)
    lengths = [(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(num)]
    return [BenchRequest(random_ids(rng, inp, vocab_size), out) for inp, out in lengths]


def fixed_requests(
    num: int, *, input_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """`num` requests of exactly `input_len` random prompt ids and `output_len` new tokens."""
    return random_requests(
        num,
        input_range=(input_len, input_len),
        output_range=(output_len, output_len),
        vocab_size=vocab_size,
        seed=seed,
    )


def shared_prefix_requests(
    *,
    num_groups: int,
    prompts_per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    seed: int = 0,
) -> list[BenchRequest]:
    """Groups of prompts that share one `system_len`-token prefix, each with its own question.

    Requests come group by group: the prompts of group g are
    `system[g] + question[g][i]` for i < prompts_per_group.
    """
    if min(num_groups, prompts_per_group, system_len, question_len, output_len) < 1:
        raise ValueError("every shared-prefix size must be at least 1")
    rng = random.Random(seed)
    requests: list[BenchRequest] = []
    for _ in range(num_groups):
        system = random_ids(rng, system_len, vocab_size)
        for _ in range(prompts_per_group):
            question = random_ids(rng, question_len, vocab_size)
            requests.append(BenchRequest(system + question, output_len))
    return requests


_TOPICS = (
    "the history of the printing press",
    "how a bicycle stays upright",
    "why the sky is blue",
    "the life cycle of a star",
    "how vaccines train the immune system",
    "the rules of chess for a beginner",
    "how to bake sourdough bread",
    "what a compiler does",
    "the water cycle",
    "how bees communicate",
    "the causes of the seasons",
    "how a transistor works",
    "the origins of the Olympic games",
    "how to plan a vegetable garden",
    "what makes a good story",
    "how the internet routes a message",
)


def chat_prompts(num: int) -> list[list[dict[str, Any]]]:
    """`num` different single-turn chat conversations (topics repeat with a counter past 16)."""
    prompts = []
    for index in range(num):
        topic = _TOPICS[index % len(_TOPICS)]
        suffix = "" if index < len(_TOPICS) else f" (take {index // len(_TOPICS) + 1})"
        content = f"Explain {topic} in a few paragraphs{suffix}."
        prompts.append([{"role": "user", "content": content}])
    return prompts


def arrival_offsets(num: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: a Poisson process at `request_rate` per second.

    An infinite rate sends everything at once (all offsets 0).
    """
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0 (use inf for all at once)")
    if request_rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed)
    offsets: list[float] = []
    now = 0.0
    for _ in range(num):
        offsets.append(now)
        now += rng.expovariate(request_rate)
    return offsets


def _check_range(bounds: tuple[int, int], name: str) -> None:
    low, high = bounds
    if not 1 <= low <= high:
        raise ValueError(f"{name} must satisfy 1 <= low <= high, got {bounds}")
