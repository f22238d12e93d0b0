"""Batched next-token sampling with per-request parameters, one call per engine step.

Pipeline for a batch of logits rows, every stage vectorized over [B, V]:
penalties (repetition over prompt + output, presence / frequency over output) →
greedy argmax for temperature-0 rows → temperature → top-k → top-p → min-p → an
exponential race `argmax(probs / Exp(1))`. A seeded request draws its row's noise from its
own generator, so its tokens depend only on its seed, its step count and its own logits.
Logprobs come from log_softmax of the raw logits, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backend.batch import host_to_device
from engine.sampling_params import SamplingParams

MASK64 = (1 << 64) - 1


def generator_seed(seed: int) -> int:
    """A request's seed (any int64) as a 32-bit generator seed, hashed (splitmix64): the
    CPU generator keeps only the low 32 bits of its seed, so seeds 0 and 2**32 would draw
    the same tokens there; hashed, no simple pattern of seeds collides on any device."""
    x = (seed + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    x ^= x >> 31
    return (x ^ (x >> 32)) & 0xFFFFFFFF


class RequestHistory:
    """What one request keeps across steps for sampling: its tokens and its own RNG.

    `generator` is None when the request has no seed; such rows share the sampler's
    generator. The engine calls `append` with every token the request emits.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.prompt_ids: list[int] = list(prompt_ids)
        self.output_ids: list[int] = []
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator(device=torch.device(device))
            self.generator.manual_seed(generator_seed(seed))
        self._prompt_array = np.asarray(self.prompt_ids, dtype=np.int64)
        self._output_array = np.empty(16, dtype=np.int64)

    def append(self, token_id: int) -> None:
        count = len(self.output_ids)
        if count == len(self._output_array):
            self._output_array = np.resize(self._output_array, 2 * count)
        self._output_array[count] = token_id
        self.output_ids.append(token_id)

    @property
    def num_steps(self) -> int:
        return len(self.output_ids)

    @property
    def prompt_array(self) -> np.ndarray:
        return self._prompt_array

    @property
    def output_array(self) -> np.ndarray:
        """The generated ids as an int64 array view (no copy)."""
        return self._output_array[: len(self.output_ids)]


@dataclass
class SampleOutput:
    """One sampled token per row, with logprobs for the rows that asked."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclass
class _BatchParams:
    """Per-row sampling parameters as [B] device tensors, and the stages the batch needs.

    The tensors travel in one host-to-device copy; the flags are decided on the host.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor
    filtered: torch.Tensor
    any_greedy: bool
    any_temperature: bool
    use_top_k_top_p: bool
    use_min_p: bool
    max_top_k: int | None

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> _BatchParams:
        """Collect the batch's parameters.

        `max_top_k` is set when every row that filters by top-k/top-p also has a top_k:
        the candidates then fit in torch.topk(max_top_k) and no full sort is needed.
        """
        sampled = [p for p in params if not p.greedy]
        filtered = [not p.greedy and (p.top_k > 0 or p.top_p < 1.0) for p in params]
        bounded = all(p.top_k > 0 for p, f in zip(params, filtered, strict=True) if f)
        columns = [
            [1.0 if p.greedy else p.temperature for p in params],
            [float(p.top_k) for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [float(p.greedy) for p in params],
            [float(f) for f in filtered],
        ]
        temperature, top_k, top_p, min_p, greedy, filtered_rows = host_to_device(
            torch.tensor(columns, dtype=torch.float32), device)
        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            greedy=greedy.bool(),
            filtered=filtered_rows.bool(),
            any_greedy=len(sampled) < len(params),
            any_temperature=any(p.temperature != 1.0 for p in sampled),
            use_top_k_top_p=any(filtered),
            use_min_p=any(p.min_p > 0.0 for p in sampled),
            max_top_k=max((p.top_k for p in sampled), default=0) if bounded else None,
        )


def _computes_with_logits(params: SamplingParams) -> bool:
    """Whether a row needs its logits in float32: anything beyond a plain argmax (which
    picks the same token from bfloat16 logits as from their exact float32 widening)."""
    return (not params.greedy or params.needs_penalties or params.logprobs
            or params.top_logprobs > 0)


class Sampler:
    """Samples one token per row of a [B, vocab] logits tensor (float32, or the model's
    bfloat16/float16: widened to float32 when a row computes more than an argmax)."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        histories: list[RequestHistory],
    ) -> SampleOutput:
        """Pick one token per row; `params[i]` and `histories[i]` describe row i."""
        return self.sample_async(logits, params, histories).result()

    def sample_async(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        histories: list[RequestHistory],
    ) -> PendingSample:
        """`sample` without waiting: the tokens stay on the device (for the next step's
        inputs) while their copy to the host runs; `result()` waits for that copy only."""
        if logits.dim() != 2 or not logits.shape[0] == len(params) == len(histories):
            raise ValueError("logits must be [B, V] with one params/history per row")
        if any(_computes_with_logits(p) for p in params):
            logits = logits.float()
        penalized = apply_penalties(logits, params, histories)
        if all(p.greedy for p in params):
            token_ids = penalized.argmax(dim=-1)
        else:
            batch = _BatchParams.build(params, logits.device)
            token_ids = self._sample_rows(penalized, histories, batch)

        logprobs, top_ids, top_values = compute_logprobs(logits, token_ids, params)
        return PendingSample(token_ids, logprobs, top_ids, top_values, params)

    def _sample_rows(
        self, penalized: torch.Tensor, histories: list[RequestHistory], batch: _BatchParams
    ) -> torch.Tensor:
        scaled = penalized
        if batch.any_temperature:
            scaled = penalized / batch.temperature.unsqueeze(1)
        filtered = apply_top_k_top_p(scaled, batch) if batch.use_top_k_top_p else scaled
        if batch.use_min_p:
            filtered = apply_min_p(filtered, batch.min_p)
        probs = torch.softmax(filtered, dim=-1)
        sampled = self._exponential_race(probs, histories)
        if batch.any_greedy:
            sampled = torch.where(batch.greedy, penalized.argmax(dim=-1), sampled)
        return sampled

    def _exponential_race(
        self, probs: torch.Tensor, histories: list[RequestHistory]
    ) -> torch.Tensor:
        """argmax(probs / E) with E ~ Exp(1) per token, a draw from `probs` per row.

        E = -log(U); argmax(probs / E) == argmax(log(U) / probs), which needs no clamping
        (a zero probability gives -inf). Seeded rows draw U from their own generator,
        the others from the sampler's.
        """
        uniform = torch.empty_like(probs)
        if any(h.generator is None for h in histories):
            uniform.uniform_(generator=self.generator)
        for row, history in enumerate(histories):
            if history.generator is not None:
                uniform[row].uniform_(generator=history.generator)
        return uniform.log_().div_(probs).argmax(dim=-1)


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[RequestHistory]
) -> torch.Tensor:
    """Repetition (prompt + output, HF semantics), presence and frequency (output only).

    Returns `logits` itself when no row has penalties, else a new tensor.
    """
    rows = [i for i, p in enumerate(params) if p.needs_penalties]
    if not rows:
        return logits
    device = logits.device
    vocab = logits.shape[1]
    row_index = host_to_device(torch.tensor(rows, dtype=torch.long), device)
    sub = logits.index_select(0, row_index)
    seen, output_counts = _token_occurrences([histories[i] for i in rows], vocab, device)

    penalties = host_to_device(torch.tensor(
        [
            [params[i].repetition_penalty for i in rows],
            [params[i].frequency_penalty for i in rows],
            [params[i].presence_penalty for i in rows],
        ]
    ), device)
    repetition, frequency, presence = penalties.unsqueeze(2)
    repeated = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, repeated, sub)
    sub = sub - frequency * output_counts - presence * (output_counts > 0).float()
    return logits.index_copy(0, row_index, sub)


def _token_occurrences(
    histories: list[RequestHistory], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """([P, vocab] bool: in prompt or output, [P, vocab] float: count in output).

    The ids travel to the device as one padded [P, prompt + output] array (pad = vocab,
    a column dropped afterwards).
    """
    prompt_width = max(len(h.prompt_ids) for h in histories)
    output_width = max(h.num_steps for h in histories)
    padded = np.full((len(histories), prompt_width + output_width), vocab, dtype=np.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history.prompt_ids)] = history.prompt_array
        padded[row, prompt_width : prompt_width + history.num_steps] = history.output_array
    ids = host_to_device(torch.from_numpy(padded), device)

    seen = torch.zeros(len(histories), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, ids, True)
    counts = torch.zeros(len(histories), vocab + 1, device=device)
    output_ids = ids[:, prompt_width:]
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=counts.dtype))
    return seen[:, :vocab], counts[:, :vocab]


def apply_top_k_top_p(logits: torch.Tensor, batch: _BatchParams) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p (on the top-k renormalized distribution), drop.

    Candidates come from torch.topk when every filtered row has a top_k, else from one
    full descending sort; rows without either filter are returned untouched.
    """
    vocab = logits.shape[1]
    if batch.max_top_k is not None:
        values, indices = logits.topk(min(batch.max_top_k, vocab), dim=-1)
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    positions = torch.arange(values.shape[1], device=logits.device).unsqueeze(0)
    top_k = batch.top_k.unsqueeze(1)
    values = values.masked_fill((top_k > 0) & (positions >= top_k), float("-inf"))

    probs = torch.softmax(values, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = batch.top_p.unsqueeze(1)
    drop = (mass_before > top_p) & (top_p < 1.0)
    drop[:, 0] = False
    values = values.masked_fill(drop, float("-inf"))

    kept = torch.full_like(logits, float("-inf")).scatter_(1, indices, values)
    return torch.where(batch.filtered.unsqueeze(1), kept, logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chosen-token logprobs and top-k (ids, logprobs) from the raw logits, if any row asks."""
    if not any(p.logprobs or p.top_logprobs > 0 for p in params):
        return None, None, None
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    max_top = max(p.top_logprobs for p in params)
    if max_top == 0:
        return chosen, None, None
    top_values, top_ids = logprobs.topk(min(max_top, logits.shape[1]), dim=-1)
    return chosen, top_ids, top_values


class PendingSample:
    """A step's sampled tokens (and logprobs) on the device, on their way to the host.

    `token_ids` stays a device tensor: the next step reads future tokens from it. On CUDA
    the results are copied into pinned host memory behind the sampling kernels and an event
    marks the end of the copy, so `result()` waits for this step only, never for later work
    queued on the stream.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        logprobs: torch.Tensor | None,
        top_ids: torch.Tensor | None,
        top_values: torch.Tensor | None,
        params: list[SamplingParams],
    ) -> None:
        self.token_ids = token_ids
        self._params = params
        self._parts: list[torch.Tensor | None] = [token_ids, logprobs, top_ids, top_values]
        self._event: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._parts = [_to_pinned_host(t) for t in self._parts]
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampleOutput:
        """The host copy (one wait, then one .tolist() per tensor)."""
        if self._event is not None:
            self._event.synchronize()
        token_ids, logprobs, top_ids, top_values = self._parts
        assert token_ids is not None
        chosen = logprobs.tolist() if logprobs is not None else None
        top: list[list[tuple[int, float]]] | None = None
        if top_ids is not None and top_values is not None:
            ids_rows, value_rows = top_ids.tolist(), top_values.tolist()
            top = [
                list(zip(ids[: p.top_logprobs], values[: p.top_logprobs], strict=True))
                for ids, values, p in zip(ids_rows, value_rows, self._params, strict=True)
            ]
        elif chosen is not None:
            top = [[] for _ in self._params]
        return SampleOutput(token_ids=token_ids.tolist(), logprobs=chosen, top_logprobs=top)


def _to_pinned_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
