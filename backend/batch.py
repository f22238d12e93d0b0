"""The runner contract: one ForwardBatch in, logits out.

The scheduler builds one `ForwardBatch` per step and never touches it again. Every runner
(native paged, HF on the paged pool) reads it the same way:

- the step's new tokens of all requests are laid out flat: request b owns rows
  `qo_indptr[b]:qo_indptr[b + 1]` of `input_ids`, `positions` and `out_slots`;
- request b attends over `kv_indices[kv_indptr[b]:kv_indptr[b + 1]]`, the KV-pool slots of
  all its tokens in order (cached prefix first, then the new tokens, whose slots are
  `out_slots` of its rows). Its length is `seq_lens[b]`; the new tokens are the last
  `extend_lens[b]` of them (causal within the request);
- `logits_indices` are the rows whose next-token logits the step needs (the last new token
  of each request that samples this step; a request in the middle of a chunked prefill
  has none).

Slot 0 of the pool is a padding slot that no request owns.
"""

from __future__ import annotations

import array
import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from backend.cascade import NO_GROUP

if TYPE_CHECKING:
    from backend.slot_table import SlotTable


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64, where the new tokens' K/V go
    qo_indptr: torch.Tensor  # [B + 1] int64 (on the runner's device)
    kv_indptr: torch.Tensor  # [B + 1] int64
    kv_indices: torch.Tensor  # [sum(seq_lens)] int64
    logits_indices: torch.Tensor  # [S] int64
    seq_lens: list[int]  # host copies for shape decisions
    extend_lens: list[int]
    # groups of one-token requests sharing a KV prefix (all rows of a decode batch, the
    # single_rows of a mixed one), [4, n] int64 (backend/cascade.py), possibly a row-strided
    # view (`plan_view`: pass its rows, never flatten it); kernel sets without cascade
    # attention ignore it (the result is the same)
    cascade: torch.Tensor | None = None
    # mixed batches only: [2, n] int64, request index and token row of each request adding
    # one token (kernel sets may attend those with their decode kernel)
    single_rows: torch.Tensor | None = None
    # per-step tensors a kernel set's `prepare_attention` works out on the device for its
    # attention calls of every layer (the triton set: a decode batch's launch order)
    attention_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every request adds exactly one token (the CUDA-graph case)."""
        return all(n == 1 for n in self.extend_lens)

    @functools.cached_property
    def extend_shape(self) -> tuple[int, bool]:
        """Among the requests adding more than one token: (their longest run of new tokens,
        whether attention to their cached prefixes outweighs the causal part among the new
        tokens: sum of prefix x run >= sum of run^2 / 2); (0, False) when none. Worked out
        once per batch."""
        runs = [(e, s - e) for s, e in zip(self.seq_lens, self.extend_lens) if e > 1]
        return max((e for e, _ in runs), default=0), prefix_heavy(runs)

    @functools.cached_property
    def max_single_seq_len(self) -> int:
        """The longest context among the requests adding one token (0 when none); worked out
        once per batch, however many layers ask."""
        return max((s for s, e in zip(self.seq_lens, self.extend_lens) if e == 1), default=0)

    @property
    def prefix_lens(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens, self.extend_lens)]


def build_forward_batch(
    token_ids: list[list[int]],
    prefix_lens: list[int],
    kv_slots: list[list[int]],
    sample_mask: list[bool],
    device: torch.device,
) -> ForwardBatch:
    """Pack per-request new tokens and slot lists into one ForwardBatch.

    `token_ids[b]` are request b's new tokens, `prefix_lens[b]` how many tokens precede them
    in its KV, `kv_slots[b]` the slots of all `prefix_lens[b] + len(token_ids[b])` tokens,
    `sample_mask[b]` whether the step needs its next-token logits.
    """
    extend_lens = [len(t) for t in token_ids]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    flat_ids: list[int] = []
    positions: list[int] = []
    out_slots: list[int] = []
    kv_flat: list[int] = []
    qo_indptr = [0]
    kv_indptr = [0]
    logits_indices: list[int] = []
    for ids, prefix, slots, sample in zip(token_ids, prefix_lens, kv_slots, sample_mask):
        flat_ids.extend(ids)
        positions.extend(range(prefix, prefix + len(ids)))
        out_slots.extend(slots[prefix:])
        kv_flat.extend(slots)
        qo_indptr.append(qo_indptr[-1] + len(ids))
        kv_indptr.append(kv_indptr[-1] + len(slots))
        if sample:
            logits_indices.append(qo_indptr[-1] - 1)

    singles = single_token_rows(extend_lens, qo_indptr)
    (input_ids, positions_t, out_slots_t, qo_indptr_t, kv_indptr_t, kv_indices, logits_t,
     singles_t) = to_device_at_once([flat_ids, positions, out_slots, qo_indptr, kv_indptr,
                                     kv_flat, logits_indices, singles], device)
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions_t,
        out_slots=out_slots_t,
        qo_indptr=qo_indptr_t,
        kv_indptr=kv_indptr_t,
        kv_indices=kv_indices,
        logits_indices=logits_t,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        single_rows=singles_t.view(2, -1) if singles else None,
    )


def build_forward_batch_from_table(
    token_ids: list[list[int]],
    prefix_lens: list[int],
    out_slots: list[list[int]],
    rows: list[int],
    sample_mask: list[bool],
    table: SlotTable,
    cascade: list[int] | None = None,
) -> ForwardBatch:
    """Pack a step whose KV slots live in a device-resident `SlotTable`.

    As `build_forward_batch`, except that request b's slots are read on the device from
    `table` row `rows[b]` and the host passes only the slots of its new tokens,
    `out_slots[b]`: host work follows the number of new tokens, not the context lengths.
    The table's staged writes travel in the same host→device copy as the step's inputs and
    are applied before the KV index list is gathered. `cascade` is the flat cascade plan of
    the step's one-token requests (backend/cascade.py), sent in the same copy.
    """
    extend_lens = [len(t) for t in token_ids]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    flat_ids: list[int] = []
    positions: list[int] = []
    flat_out_slots: list[int] = []
    qo_indptr = [0]
    kv_indptr = [0]
    logits_indices: list[int] = []
    for ids, prefix, slots, seq_len, sample in zip(
        token_ids, prefix_lens, out_slots, seq_lens, sample_mask
    ):
        flat_ids.extend(ids)
        positions.extend(range(prefix, seq_len))
        flat_out_slots.extend(slots)
        qo_indptr.append(qo_indptr[-1] + len(ids))
        kv_indptr.append(kv_indptr[-1] + seq_len)
        if sample:
            logits_indices.append(qo_indptr[-1] - 1)
    if len(flat_out_slots) != len(flat_ids):
        raise ValueError("out_slots must hold one slot per new token")
    return _table_batch(flat_ids, positions, flat_out_slots, qo_indptr, kv_indptr,
                        logits_indices, rows, seq_lens, extend_lens, table, cascade,
                        single_token_rows(extend_lens, qo_indptr))


def build_one_token_batch_from_table(
    token_ids: list[int],
    seq_lens: list[int],
    out_slots: list[int],
    rows: list[int],
    sample_mask: list[bool],
    table: SlotTable,
    cascade: list[int] | None = None,
) -> ForwardBatch:
    """`build_forward_batch_from_table` for a step adding one token to each request (a
    decode step): request b's token `token_ids[b]` at position `seq_lens[b] - 1` into slot
    `out_slots[b]`, with no per-request lists."""
    batch_size = len(token_ids)
    if not len(seq_lens) == len(out_slots) == len(rows) == len(sample_mask) == batch_size:
        raise ValueError("one token, length, slot, row and sample flag per request")
    positions = [n - 1 for n in seq_lens]
    qo_indptr = list(range(batch_size + 1))
    kv_indptr = [0, *itertools.accumulate(seq_lens)]
    logits_indices = list(itertools.compress(range(batch_size), sample_mask))
    return _table_batch(token_ids, positions, out_slots, qo_indptr, kv_indptr, logits_indices,
                        rows, seq_lens, [1] * batch_size, table, cascade, [])


def _table_batch(
    flat_ids: list[int], positions: list[int], out_slots: list[int], qo_indptr: list[int],
    kv_indptr: list[int], logits_indices: list[int], rows: list[int], seq_lens: list[int],
    extend_lens: list[int], table: SlotTable, cascade: list[int] | None, singles: list[int],
) -> ForwardBatch:
    """The packed step of both table builders: the table's staged writes and the step's
    inputs in one host→device copy, then the KV indices gathered on the device."""
    write_starts, write_lengths, write_slots = table.take_writes()
    copy_targets, copy_sources, copy_lengths = table.take_copies()
    plan = aligned_plan(cascade or [])
    parts = [flat_ids, positions, out_slots, qo_indptr, kv_indptr, logits_indices, rows,
             write_starts, write_lengths, write_slots, copy_targets, copy_sources,
             copy_lengths, plan, singles]
    (input_ids, positions_t, out_slots_t, qo_indptr_t, kv_indptr_t, logits_t, rows_t,
     write_starts_t, write_lengths_t, write_slots_t, copy_targets_t, copy_sources_t,
     copy_lengths_t, cascade_t, singles_t) = to_device_at_once(parts, table.device)
    table.apply_writes(write_starts_t, write_lengths_t, write_slots_t)
    table.apply_copies(copy_targets_t, copy_sources_t, copy_lengths_t, sum(copy_lengths))
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions_t,
        out_slots=out_slots_t,
        qo_indptr=qo_indptr_t,
        kv_indptr=kv_indptr_t,
        kv_indices=table.gather(rows, seq_lens, rows_t, kv_indptr_t),
        logits_indices=logits_t,
        seq_lens=seq_lens,
        extend_lens=extend_lens,
        cascade=plan_view(cascade_t, len(cascade) // 4) if cascade else None,
        single_rows=singles_t.view(2, -1) if singles else None,
    )


def prefix_heavy(runs: list[tuple[int, int]]) -> bool:
    """Whether, over (new tokens, cached prefix) runs, attention to the cached prefixes
    outweighs the causal part among the new tokens: sum of prefix x run >= sum of run^2 / 2
    (False without runs). The extend kernel's tile size follows it."""
    prefix_work = sum(e * p for e, p in runs)
    causal_work = sum(e * e for e, _ in runs) / 2
    return bool(runs) and prefix_work >= causal_work


def aligned_plan(plan: list[int]) -> list[int]:
    """A flat [4 * B] cascade plan laid out with each of its four rows padded to an even
    length (`plan_view` reads it back): on the device every row then starts 16-byte aligned,
    whatever B. Triton specialises a kernel on its pointers' alignment, so a plan whose rows
    were aligned in one step and not in the next would compile the kernels again
    mid-traffic."""
    width = len(plan) // 4
    if width % 2 == 0:
        return plan
    padded: list[int] = []
    for row in range(4):
        padded.extend(plan[row * width : (row + 1) * width])
        padded.append(NO_GROUP if row == 0 else 0)
    return padded


def plan_view(padded: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The [4, B] cascade plan held in `padded`, a flat tensor of `aligned_plan`'s layout: a
    row-strided view (its stride(0) may exceed B), whose rows are passed to the kernels."""
    return padded.view(4, -1)[:, :batch_size]


def single_token_rows(extend_lens: list[int], qo_indptr: list[int]) -> list[int]:
    """A mixed batch's requests adding one token: their indices, then their token rows
    (flat, for a [2, n] tensor); empty unless the batch also extends some request by more."""
    singles = [b for b, n in enumerate(extend_lens) if n == 1]
    if not singles or len(singles) == len(extend_lens):
        return []
    return singles + [qo_indptr[b] for b in singles]


def to_device_at_once(parts: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """int64 device tensors of `parts` through one host→device copy (pinned on CUDA); each
    starts 16-byte aligned, as a tensor of its own would."""
    packed = array.array("q")  # C int64s: ~4x faster to fill and wrap than torch.tensor(list)
    bounds: list[tuple[int, int]] = []
    for values in parts:
        start = len(packed)
        packed.extend(values)
        bounds.append((start, len(packed)))
        if len(values) % 2:
            packed.append(0)
    if not packed:
        packed.append(0)  # frombuffer needs a non-empty buffer
    host = torch.frombuffer(packed, dtype=torch.int64)  # shares (and keeps alive) `packed`
    on_device = host_to_device(host, device)
    return [on_device[start:end] for start, end in bounds]


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, queued behind the device's work without waiting for it: on
    CUDA through pinned memory (a copy from pageable memory may wait for the stream)."""
    if device.type == "cuda":
        host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)
    return host.to(device, non_blocking=True)


@dataclass(frozen=True)
class ModelInfo:
    """What the engine needs to know of the loaded model."""

    architecture: str
    vocab_size: int
    max_context_len: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int


class ModelRunner(Protocol):
    """Owns the model weights and the KV pool; runs one ForwardBatch at a time."""

    info: ModelInfo
    device: torch.device
    num_kv_slots: int  # usable slots, 1..num_kv_slots (slot 0 is padding)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Write the new tokens' K/V into their slots; return the logits
        [len(batch.logits_indices), vocab_size] on the runner's device, in float32 or the
        model's half-precision dtype (the sampler widens them where it computes with them).
        The logits may be a view of a static buffer (CUDA graphs): valid until the next
        `forward`."""
        ...
