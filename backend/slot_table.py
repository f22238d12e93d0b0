"""The request→slot table: every running request's KV slots, resident on the runner's device.

Row r of `table` ([num_rows + 1, width] int32) holds the slots of one running request in
token order; row 0 is a padding row that no request owns. The scheduler keeps it in step
with each request's host slot list (`Req.slots`) by staging only what changes: the slots of
a step's new tokens, a prefix matched or swapped in by the radix cache. A step's staged
writes reach the device in the same host→device copy as its other inputs, and its flat
`kv_indices` are then gathered on the device from (rows, kv_indptr), so the host's work per
step follows the number of new tokens rather than the length of the contexts.

A row's first entries can also be staged as a copy of another row's (`write_prefix`): a
request admitted on a prefix that a running request already holds takes it from that row on
the device, so the host sends three numbers instead of the prefix's slots.

Staged writes to one row never overlap before they are applied (an overlapping write applies
the staged ones first), and a copy only reads a row with nothing staged in the part it reads,
so their order on the device does not matter. Freeing a row drops its staged writes, and
applies the copies that read it first; a row's entries past its request's length are stale
and never read.

The table grows its width on demand, doubling, up to `max_width` (no request holds more
slots than the KV pool or the model's context): memory follows the longest request seen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from backend.batch import to_device_at_once

logger = logging.getLogger(__name__)

PADDING_ROW = 0
INITIAL_WIDTH = 512


class SlotTable:
    """Device-resident KV slots of up to `num_rows` requests, one row each (rows 1..num_rows)."""

    def __init__(self, num_rows: int, max_width: int, device: torch.device) -> None:
        if num_rows < 1 or max_width < 1:
            raise ValueError(f"need num_rows >= 1 and max_width >= 1, got {num_rows}, {max_width}")
        self.device = device
        self.max_width = max_width
        self.table = torch.zeros(
            num_rows + 1, min(INITIAL_WIDTH, max_width), dtype=torch.int32, device=device
        )
        self._free_rows = list(range(num_rows, PADDING_ROW, -1))
        self._in_use: set[int] = set()
        self._pending: dict[int, list[tuple[int, list[int]]]] = {}
        self._copies: dict[int, tuple[int, int]] = {}  # row -> (source row, length)
        self.num_prefix_copies = 0  # prefixes staged as row copies (write_prefix), ever
        self._use_triton = device.type == "cuda"

    # ------------------------------------------------------------------- rows
    @property
    def num_rows(self) -> int:
        return int(self.table.shape[0]) - 1

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    @property
    def rows_in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)

    def assign(self) -> int:
        """A free row for a newly admitted request."""
        if not self._free_rows:
            raise RuntimeError(f"all {self.num_rows} slot-table rows are in use")
        row = self._free_rows.pop()
        self._in_use.add(row)
        return row

    def free(self, row: int) -> None:
        """Give a row back (request released or preempted); its staged writes are dropped."""
        if row not in self._in_use:
            raise ValueError(f"slot-table row {row} is not in use")
        if any(source == row for source, _ in self._copies.values()):
            self.flush()  # a copy still reads this row
        self._in_use.remove(row)
        self._pending.pop(row, None)
        self._copies.pop(row, None)
        self._free_rows.append(row)

    # ----------------------------------------------------------------- writes
    def write(self, row: int, start: int, slots: Sequence[int]) -> None:
        """Stage `table[row, start:start + len(slots)] = slots` (applied by the next step)."""
        if row not in self._in_use:
            raise ValueError(f"slot-table row {row} is not in use")
        if not slots:
            return
        end = start + len(slots)
        if end > self.width:
            self._grow(end)
        chunks = self._pending.setdefault(row, [])
        copied = self._copies.get(row)
        if (any(s < end and start < s + len(c) for s, c in chunks)
                or (copied is not None and start < copied[1])
                or any(source == row and start < n for source, n in self._copies.values())):
            self.flush()
            chunks = self._pending.setdefault(row, [])
        chunks.append((start, list(slots)))

    def write_prefix(self, row: int, slots: Sequence[int], source: int) -> None:
        """Stage `table[row, :len(slots)] = slots`, as a copy on the device from row `source`
        when that row is in use, holds `slots` first (the caller knows) and has nothing
        staged there; else as `write` does."""
        n = len(slots)
        if (not n or source == row or row in self._copies or row in self._pending
                or not self.settled(source, n)):
            self.write(row, 0, slots)
            return
        if row not in self._in_use:
            raise ValueError(f"slot-table row {row} is not in use")
        if n > self.width:
            self._grow(n)
        self._copies[row] = (source, n)
        self.num_prefix_copies += 1

    def append(self, rows: Sequence[int], starts: Sequence[int], slots: Sequence[int]) -> None:
        """Stage `table[rows[i], starts[i]] = slots[i]` for each i: one new slot per row, just
        past every slot that row holds or has staged (a decode step's), so it overlaps nothing
        and needs none of `write`'s checks."""
        if not rows:
            return
        end = max(starts) + 1
        if end > self.width:
            self._grow(end)
        pending = self._pending
        for row, start, slot in zip(rows, starts, slots):
            chunks = pending.get(row)
            if chunks is None:
                pending[row] = [(start, [slot])]
            else:
                chunks.append((start, [slot]))

    def settled(self, row: int, length: int) -> bool:
        """Whether row `row` is in use with nothing staged in its first `length` entries
        (what the device holds there is final: a copy may read it)."""
        return (row in self._in_use and row not in self._copies
                and not any(s < length for s, _ in self._pending.get(row, ())))

    @property
    def num_pending(self) -> int:
        """Staged slot writes not yet applied (a copied prefix counts its length)."""
        return (sum(len(c) for chunks in self._pending.values() for _, c in chunks)
                + sum(n for _, n in self._copies.values()))

    def take_writes(self) -> tuple[list[int], list[int], list[int]]:
        """The staged writes as runs: each run's first flat index into `table.view(-1)`, its
        length, and all runs' slots back to back; clears them. The caller applies them with
        `apply_writes` before the width can change. Runs rather than one index per slot:
        admitting a request with a long cached prefix writes thousands of slots. When every
        run is one slot (a decode step's), `lengths` is empty and `starts` are the indices."""
        starts: list[int] = []
        lengths: list[int] = []
        values: list[int] = []
        width = self.width
        for row, chunks in self._pending.items():
            for start, slots in chunks:
                starts.append(row * width + start)
                lengths.append(len(slots))
                values.extend(slots)
        self._pending.clear()
        if len(starts) == len(values):
            return starts, [], values
        return starts, lengths, values

    def take_copies(self) -> tuple[list[int], list[int], list[int]]:
        """The staged row copies as runs: each run's first flat index into `table.view(-1)`
        to write, the first one to read, and its length; clears them. Applied with
        `apply_copies`, like `take_writes`'s runs."""
        width = self.width
        targets = [row * width for row in self._copies]
        sources = [source * width for source, _ in self._copies.values()]
        lengths = [n for _, n in self._copies.values()]
        self._copies.clear()
        return targets, sources, lengths

    def apply_writes(self, starts: torch.Tensor, lengths: torch.Tensor,
                     values: torch.Tensor) -> None:
        """Apply writes from `take_writes`, given as int64 tensors on the table's device."""
        total = values.numel()
        if not total:
            return
        flat = starts if not lengths.numel() else _run_indices(starts, lengths, total)
        self.table.view(-1).index_copy_(0, flat, values.to(torch.int32))

    def apply_copies(self, targets: torch.Tensor, sources: torch.Tensor, lengths: torch.Tensor,
                     total: int) -> None:
        """Apply copies from `take_copies` (int64 tensors on the table's device; `total` is
        the sum of `lengths`, known on the host)."""
        if not total:
            return
        flat = self.table.view(-1)
        flat.index_copy_(0, _run_indices(targets, lengths, total),
                         flat.index_select(0, _run_indices(sources, lengths, total)))

    def flush(self) -> None:
        """Apply the staged writes and copies now, with their own host→device copy."""
        starts, lengths, values = self.take_writes()
        targets, sources, copy_lengths = self.take_copies()
        if values or copy_lengths:
            (starts_t, lengths_t, values_t, targets_t, sources_t,
             copy_lengths_t) = to_device_at_once(
                [starts, lengths, values, targets, sources, copy_lengths], self.device)
            self.apply_writes(starts_t, lengths_t, values_t)
            self.apply_copies(targets_t, sources_t, copy_lengths_t, sum(copy_lengths))

    def _grow(self, needed: int) -> None:
        if needed > self.max_width:
            raise ValueError(f"a request needs {needed} slots; the table holds {self.max_width}")
        width = min(self.max_width, max(needed, 2 * self.width))
        grown = torch.zeros(self.table.shape[0], width, dtype=self.table.dtype, device=self.device)
        grown[:, : self.width] = self.table
        logger.debug("slot table grown to %d columns", width)
        self.table = grown

    # ------------------------------------------------------------------ reads
    def gather(
        self, rows: list[int], seq_lens: list[int], rows_t: torch.Tensor, kv_indptr: torch.Tensor
    ) -> torch.Tensor:
        """Flat int64 KV indices: the first `seq_lens[b]` slots of row `rows[b]` for each b,
        back to back. `rows_t` and `kv_indptr` are the same on the table's device (the CUDA
        kernel reads them there). Staged writes must have been applied."""
        if not self._use_triton:
            return gather_rows(self.table, rows, seq_lens)
        from backend.sglang.kernels.triton.kv_indices import gather_kv_indices

        out = torch.empty(sum(seq_lens), dtype=torch.int64, device=self.device)
        gather_kv_indices(self.table, rows_t, kv_indptr, out)
        return out


def _run_indices(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices of runs: run i covers starts[i] .. starts[i] + lengths[i] - 1, back to
    back (`total` = the lengths' sum, so no host sync sizes the output)."""
    run_offsets = torch.cumsum(lengths, 0) - lengths
    return (torch.repeat_interleave(starts - run_offsets, lengths, output_size=total)
            + torch.arange(total, device=starts.device))


def gather_rows(table: torch.Tensor, rows: list[int], seq_lens: list[int]) -> torch.Tensor:
    """`SlotTable.gather` without the CUDA kernel: one concatenation of row prefixes."""
    if not rows:
        return torch.empty(0, dtype=torch.int64, device=table.device)
    return torch.cat([table[row, :n] for row, n in zip(rows, seq_lens)]).to(torch.int64)
