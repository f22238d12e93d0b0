"""The request→slot table: rows, staged writes, the device gather (torch and Triton), the
batch built from it, and the scheduler keeping it in step with its running requests."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from backend.batch import (  # noqa: E402
    ForwardBatch,
    build_forward_batch,
    build_forward_batch_from_table,
    build_one_token_batch_from_table,
)
from backend.slot_table import INITIAL_WIDTH, SlotTable, gather_rows  # noqa: E402
from config import Config  # noqa: E402
from engine.request import Req  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import IN_BATCH_PREFIX_MIN, Scheduler  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")


def row_of(table: SlotTable, row: int, length: int) -> list[int]:
    return [int(s) for s in table.table[row, :length].tolist()]


# ---------------------------------------------------------------------- rows


def test_rows_are_distinct_never_padding_and_reused_after_free() -> None:
    table = SlotTable(4, 64, CPU)
    rows = [table.assign() for _ in range(4)]
    assert sorted(rows) == [1, 2, 3, 4]
    assert table.num_free == 0 and table.rows_in_use == {1, 2, 3, 4}
    with pytest.raises(RuntimeError):
        table.assign()
    table.free(rows[2])
    assert table.rows_in_use == {1, 2, 3, 4} - {rows[2]}
    assert table.assign() == rows[2]
    with pytest.raises(ValueError):
        table.free(0)
    table.free(rows[0])
    with pytest.raises(ValueError):
        table.free(rows[0])
    with pytest.raises(ValueError):
        table.write(rows[0], 0, [1])


# -------------------------------------------------------------------- writes


def test_staged_writes_land_on_flush_and_only_then() -> None:
    table = SlotTable(2, 64, CPU)
    row = table.assign()
    table.write(row, 0, [7, 8, 9])
    table.write(row, 3, [10])
    assert table.num_pending == 4
    assert row_of(table, row, 4) == [0, 0, 0, 0]
    table.flush()
    assert table.num_pending == 0
    assert row_of(table, row, 4) == [7, 8, 9, 10]
    assert row_of(table, 0, 4) == [0, 0, 0, 0]


def test_writes_travel_as_runs_or_as_single_slots() -> None:
    """A long write is one run (start, length); a step of one-slot writes (decode) sends the
    indices alone. Either way the table ends up the same."""
    table = SlotTable(3, 64, CPU)
    a, b = table.assign(), table.assign()
    table.write(a, 0, list(range(100, 140)))
    table.write(b, 5, [7])
    starts, lengths, values = table.take_writes()
    assert lengths == [40, 1] and len(starts) == 2 and len(values) == 41
    table.apply_writes(torch.tensor(starts), torch.tensor(lengths), torch.tensor(values))
    table.write(a, 40, [41])
    table.write(b, 6, [8])
    starts, lengths, values = table.take_writes()
    assert lengths == [] and starts == [a * table.width + 40, b * table.width + 6]
    table.apply_writes(torch.tensor(starts), torch.tensor(lengths, dtype=torch.int64),
                       torch.tensor(values))
    assert row_of(table, a, 41) == list(range(100, 140)) + [41]
    assert row_of(table, b, 7) == [0, 0, 0, 0, 0, 7, 8]


def test_prefix_rewrite_overrides_earlier_slots_even_when_staged() -> None:
    table = SlotTable(2, 64, CPU)
    row = table.assign()
    table.write(row, 0, [1, 2, 3, 4, 5])
    table.flush()
    table.write(row, 5, [6])
    table.write(row, 1, [20, 30])  # a prefix swapped for the radix cache's slots
    table.flush()
    assert row_of(table, row, 6) == [1, 20, 30, 4, 5, 6]
    table.write(row, 6, [7, 8])
    table.write(row, 6, [70])  # overlaps a staged write: the later one wins
    table.flush()
    assert row_of(table, row, 8) == [1, 20, 30, 4, 5, 6, 70, 8]


def test_free_drops_staged_writes_of_the_row() -> None:
    table = SlotTable(1, 64, CPU)
    row = table.assign()
    table.write(row, 0, [5, 6, 7])
    table.free(row)
    again = table.assign()
    assert again == row and table.num_pending == 0
    table.write(again, 0, [9])
    table.flush()
    assert row_of(table, row, 1) == [9]


def test_caller_list_is_copied_when_staged() -> None:
    table = SlotTable(1, 64, CPU)
    row = table.assign()
    slots = [3, 4]
    table.write(row, 0, slots)
    slots.extend([5, 6])
    table.write(row, 2, [50, 60])
    table.flush()
    assert row_of(table, row, 4) == [3, 4, 50, 60]


def test_prefix_copied_from_a_settled_row_on_the_device() -> None:
    table = SlotTable(4, 64, CPU)
    source, target = table.assign(), table.assign()
    table.write(source, 0, [5, 6, 7, 8])
    table.flush()
    table.write_prefix(target, [5, 6, 7], source)
    table.write(target, 3, [40])  # the admitted request's own new slot, after the prefix
    assert table.num_prefix_copies == 1 and table.num_pending == 4
    starts, lengths, values = table.take_writes()
    assert values == [40]  # the prefix itself is not sent
    table.apply_writes(torch.tensor(starts), torch.tensor(lengths, dtype=torch.int64),
                       torch.tensor(values))
    targets, sources, copy_lengths = table.take_copies()
    table.apply_copies(torch.tensor(targets), torch.tensor(sources), torch.tensor(copy_lengths),
                       sum(copy_lengths))
    assert row_of(table, target, 4) == [5, 6, 7, 40]
    assert row_of(table, source, 4) == [5, 6, 7, 8]


def test_prefix_sent_as_values_when_its_source_row_is_not_settled() -> None:
    table = SlotTable(4, 64, CPU)
    source, target, other = table.assign(), table.assign(), table.assign()
    table.write(source, 0, [5, 6, 7])  # staged, not applied: the copy would read stale slots
    table.write_prefix(target, [5, 6], source)
    table.write_prefix(other, [5, 6], target)  # target itself is not settled either
    table.write_prefix(other, [], source)
    assert table.num_prefix_copies == 0
    table.flush()
    assert row_of(table, target, 2) == [5, 6] and row_of(table, other, 2) == [5, 6]
    fresh = table.assign()
    table.write_prefix(fresh, [5, 6], fresh)  # itself
    table.flush()
    assert table.num_prefix_copies == 0 and row_of(table, fresh, 2) == [5, 6]


def test_freeing_or_rewriting_a_copied_row_keeps_every_row_right() -> None:
    table = SlotTable(4, 64, CPU)
    source, target = table.assign(), table.assign()
    table.write(source, 0, [5, 6, 7])
    table.flush()
    table.write_prefix(target, [5, 6, 7], source)
    table.free(source)  # the staged copy reads it: applied first
    assert row_of(table, target, 3) == [5, 6, 7] and table.num_pending == 0
    reused = table.assign()
    table.write(reused, 0, [9, 9, 9])
    table.flush()
    assert row_of(table, target, 3) == [5, 6, 7]
    again = table.assign()
    table.write_prefix(again, [5, 6], target)
    table.write(again, 1, [30])  # overlaps the staged copy: the copy lands first
    table.write(target, 0, [50])  # overlaps what the copy reads: the copy lands first
    table.flush()
    assert row_of(table, again, 2) == [5, 30] and row_of(table, target, 3) == [50, 6, 7]
    dropped = table.assign() if table.num_free else again
    table.write_prefix(dropped, [50, 6], target)
    table.free(dropped)  # its own staged copy goes with it
    assert table.num_pending == 0


def test_width_grows_on_demand_up_to_the_cap() -> None:
    cap = INITIAL_WIDTH * 3
    table = SlotTable(2, cap, CPU)
    assert table.width == INITIAL_WIDTH
    row = table.assign()
    table.write(row, 0, [1, 2])
    table.flush()
    table.write(row, INITIAL_WIDTH, [3])
    assert table.width == 2 * INITIAL_WIDTH
    table.write(row, cap - 1, [4])
    assert table.width == cap
    table.flush()
    assert row_of(table, row, 2) == [1, 2]
    assert int(table.table[row, INITIAL_WIDTH]) == 3 and int(table.table[row, cap - 1]) == 4
    with pytest.raises(ValueError):
        table.write(row, cap, [5])
    assert SlotTable(2, 100, CPU).width == 100


# -------------------------------------------------------------------- gather


def random_table(
    rng: random.Random, num_rows: int, width: int
) -> tuple[SlotTable, list[list[int]]]:
    table = SlotTable(num_rows, width, DEVICE)
    contents: list[list[int]] = [[0] * width]
    for _ in range(num_rows):
        row = table.assign()
        slots = [rng.randrange(1, 1 << 30) for _ in range(width)]
        table.write(row, 0, slots)
        contents.append(slots)
    table.flush()
    return table, contents


@pytest.mark.parametrize("seed", range(4))
def test_gather_equals_concatenated_rows(seed: int) -> None:
    from backend.sglang.kernels.triton.kv_indices import gather_kv_indices

    rng = random.Random(seed)
    table, contents = random_table(rng, 6, 1500)
    batch_size = rng.randint(1, 9)
    rows = [rng.choice([0, *range(1, 7)]) for _ in range(batch_size)]  # repeats, padding row
    lengths = [rng.choice([0, 1, rng.randint(1, 1500)]) for _ in rows]
    expected = [s for row, n in zip(rows, lengths) for s in contents[row][:n]]
    indptr = [0]
    for n in lengths:
        indptr.append(indptr[-1] + n)
    rows_t = torch.tensor(rows, dtype=torch.int64, device=DEVICE)
    indptr_t = torch.tensor(indptr, dtype=torch.int64, device=DEVICE)
    total = indptr[-1]
    by_torch = gather_rows(table.table, rows, lengths)
    by_triton = torch.full((total,), -1, dtype=torch.int64, device=DEVICE)
    gather_kv_indices(table.table, rows_t, indptr_t, by_triton)
    by_table = table.gather(rows, lengths, rows_t, indptr_t)
    for actual in (by_torch, by_triton, by_table):
        assert actual.dtype == torch.int64
        assert actual.tolist() == expected


# ---------------------------------------------------------------- the batch


def assert_same_batch(actual: ForwardBatch, expected: ForwardBatch) -> None:
    for name in ("input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr",
                 "kv_indices", "logits_indices"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == want.dtype == torch.int64, name
        assert got.tolist() == want.tolist(), name
    assert actual.seq_lens == expected.seq_lens
    assert actual.extend_lens == expected.extend_lens


@pytest.mark.parametrize("seed", range(3))
def test_batch_from_table_equals_batch_from_slot_lists(seed: int) -> None:
    rng = random.Random(seed)
    table = SlotTable(8, 4096, DEVICE)
    token_ids: list[list[int]] = []
    prefix_lens: list[int] = []
    kv_slots: list[list[int]] = []
    rows: list[int] = []
    for _ in range(rng.randint(1, 8)):
        prefix = rng.choice([0, rng.randint(1, 700)])
        new = rng.choice([1, rng.randint(1, 300)])
        slots = rng.sample(range(1, 50_000), prefix + new)
        row = table.assign()
        table.write(row, 0, slots[:prefix])
        table.flush()  # the prefix was mirrored by an earlier step
        table.write(row, prefix, slots[prefix:])
        token_ids.append([rng.randrange(1000) for _ in range(new)])
        prefix_lens.append(prefix)
        kv_slots.append(slots)
        rows.append(row)
    sample_mask = [rng.random() < 0.7 for _ in rows]
    expected = build_forward_batch(token_ids, prefix_lens, kv_slots, sample_mask, DEVICE)
    actual = build_forward_batch_from_table(
        token_ids, prefix_lens, [s[p:] for s, p in zip(kv_slots, prefix_lens)], rows,
        sample_mask, table,
    )
    assert table.num_pending == 0
    assert_same_batch(actual, expected)


@pytest.mark.parametrize("seed", range(3))
def test_one_token_batch_equals_the_general_batch(seed: int) -> None:
    """A decode step: each request's next slot staged with `append`, the batch packed by the
    one-token builder, equal to the general builder's from the slot lists."""
    rng = random.Random(seed)
    table = SlotTable(8, 1024, DEVICE)
    kv_slots: list[list[int]] = []
    rows: list[int] = []
    for _ in range(rng.randint(1, 8)):
        slots = rng.sample(range(1, 50_000), rng.randint(1, 700))
        row = table.assign()
        table.write(row, 0, slots[:-1])
        table.flush()
        kv_slots.append(slots)
        rows.append(row)
    table.append(rows, [len(s) - 1 for s in kv_slots], [s[-1] for s in kv_slots])
    assert table.num_pending == len(rows)
    token_ids = [rng.randrange(1000) for _ in rows]
    sample_mask = [rng.random() < 0.7 for _ in rows]
    expected = build_forward_batch([[t] for t in token_ids], [len(s) - 1 for s in kv_slots],
                                   kv_slots, sample_mask, DEVICE)
    actual = build_one_token_batch_from_table(
        token_ids, [len(s) for s in kv_slots], [s[-1] for s in kv_slots], rows, sample_mask,
        table,
    )
    assert table.num_pending == 0
    assert_same_batch(actual, expected)
    assert actual.extend_lens == [1] * len(rows)


def test_append_grows_the_table_past_its_width() -> None:
    table = SlotTable(2, 4 * INITIAL_WIDTH, CPU)
    row = table.assign()
    table.append([row], [INITIAL_WIDTH + 3], [77])
    table.flush()
    assert table.width > INITIAL_WIDTH
    assert int(table.table[row, INITIAL_WIDTH + 3]) == 77


# ------------------------------------------------------------ the scheduler


def fake_token(req: Req, rng: random.Random) -> None:
    """What the engine does with a sampled token, with a random token instead of a model's."""
    req.token_ids.append(rng.randrange(3, 60))
    if req.num_output >= req.params.max_new_tokens:
        req.finish_reason = "length"


def check_table(sched: Scheduler) -> None:
    table = sched.table
    assert table.rows_in_use == {r.row for r in sched.running}
    assert len(table.rows_in_use) == len(sched.running)
    assert all(r.row == 0 for r in sched.waiting)
    table.flush()
    for req in sched.running:
        assert row_of(table, req.row, req.num_computed) == req.slots


@pytest.mark.parametrize(("prefix_cache", "chunk"), [(True, 24), (True, 80), (False, 24)])
def test_scheduler_keeps_table_rows_equal_to_running_requests(
    prefix_cache: bool, chunk: int
) -> None:
    """Random tokens stand in for the model; prompts share a prefix too short to wait for
    (so concurrent prefills get their prefix swapped for the radix cache's slots)."""
    rng = random.Random(1)
    config = Config(
        max_running_requests=6, chunked_prefill_size=chunk, prefix_cache=prefix_cache,
    )
    sched = Scheduler(config, num_slots=150, device=DEVICE, max_context_len=120)
    shared = [rng.randrange(3, 60) for _ in range(IN_BATCH_PREFIX_MIN - 4)]
    for i in range(24):
        own = [rng.randrange(3, 60) for _ in range(rng.randint(5, 40))]
        prompt = (shared if i % 2 else []) + own
        params = SamplingParams(max_new_tokens=rng.randint(1, 30), temperature=0.0)
        sched.add(Req(rid=str(i), prompt_ids=prompt, params=params, sink=lambda d: None))
    steps = 0
    while sched.has_work:
        plan = sched.schedule()
        assert plan is not None
        steps += 1
        if plan.batch is not None:
            expected = [s for r, start, n in zip(plan.reqs, plan.starts, plan.batch.extend_lens)
                        for s in r.slots[: start + n]]
            assert plan.batch.kv_indices.tolist() == expected
            assert all(r.row != 0 for r in plan.reqs)
        for req in plan.sample_reqs:
            fake_token(req, rng)
        sched.cache_prompts(plan, None)
        sched.release_finished(plan.sample_reqs)
        check_table(sched)
        if steps % 7 == 0 and sched.running:  # an abort in the middle of the run
            sched.remove(sched.running[-1])
            check_table(sched)
    assert sched.stats.num_preemptions > 0
    assert (sched.table.num_prefix_copies > 0) == prefix_cache  # cached prefixes row to row
    assert sched.table.num_free == config.max_running_requests
    assert sched.allocator.num_used == sched.radix.evictable_size
