"""A request's own state, and the messages it sends back to its caller.

Invariant table of a request `r` while it holds KV (running):

| field           | meaning                                                                |
|-----------------|------------------------------------------------------------------------|
| r.token_ids     | prompt + generated tokens                                              |
| r.slots         | KV slots of token_ids[:len(slots)]; len(r.slots) == r.num_computed      |
| r.cached_len    | slots[:cached_len] belong to the radix cache (locked through r.node);  |
|                 | slots[cached_len:] belong to the request                                |
| r.num_computed  | tokens whose K/V are in the pool; the next step computes from here     |
| r.row           | its row of the scheduler's SlotTable, which mirrors r.slots on the     |
|                 | device once the next step's staged writes are applied                  |
| r.num_future    | 0 or 1: a token sampled on the device whose value the host has not     |
|                 | read yet (overlap scheduling); it counts in seq_len and num_output,    |
|                 | not in token_ids, and a step that computes it reads it on the device   |

A waiting request holds no slots, no lock and no row (num_computed == cached_len == row == 0).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams

_arrival = itertools.count()
FUTURE_TOKEN = 0  # placeholder id of a future token in a step's host-side inputs


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class StreamDelta:
    """One message of a request's stream: new text and tokens; the last one has finish_reason."""

    rid: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status an error maps to (503: the engine is gone)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Sink = Callable[[StreamDelta], None]


@dataclass(eq=False)
class Req:
    """One sequence being generated (a request with n > 1 is n of these)."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    index: int = 0
    waits_for: Req | None = None  # n > 1: siblings wait until the first has sampled
    token_ids: list[int] = field(default_factory=list, init=False)
    slots: list[int] = field(default_factory=list)
    cached_len: int = 0
    node: Any = None
    row: int = 0  # SlotTable row while running; 0 (the padding row) while waiting
    num_prompt_cached: int = -1  # cache hit at first admission (reported in usage)
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    state: Any = None  # sampler history, detokenizer, stop checker (owned by the engine)
    num_future: int = 0  # sampled on the device, not yet read back (see the table above)
    sink_failed: bool = False  # its sink raised: no more deltas, the request is aborted

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) + self.num_future - len(self.prompt_ids)

    @property
    def seq_len(self) -> int:
        return len(self.token_ids) + self.num_future

    def step_tokens(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) for a forward step; a future token reads as
        FUTURE_TOKEN (the step fills it in on the device)."""
        known = self.token_ids[start : start + count]
        return known + [FUTURE_TOKEN] * (count - len(known))

    def future_is_last(self, max_context_len: int) -> bool:
        """Whether the future token ends the request by length: no step needs to compute it."""
        if not self.num_future:
            return False
        return self.num_output >= self.params.max_new_tokens or self.seq_len >= max_context_len

    @property
    def num_computed(self) -> int:
        return len(self.slots)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V the request still has to compute before it can sample."""
        return self.seq_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids) - len(self.prompt_ids),
            cached_tokens=max(self.num_prompt_cached, 0),
        )
