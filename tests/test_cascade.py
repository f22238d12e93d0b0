"""The host side of cascade attention: which decode rows are proposed as groups, and the
scheduler's order around it."""

from __future__ import annotations

import torch

from backend.cascade import (
    CASCADE_MAX_ROWS,
    NO_GROUP,
    cascade_key,
    cascade_rows_per_group,
    plan_cascade,
)
from config import Config
from engine.request import Req
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def _rows(plan: list[int], batch_size: int) -> list[list[int]]:
    return [plan[i * batch_size:(i + 1) * batch_size] for i in range(4)]


def test_key_is_the_slot_at_the_threshold() -> None:
    slots = list(range(100, 140))
    assert cascade_key(slots, 16) == 115
    assert cascade_key(slots[:16], 16) == NO_GROUP  # too short to share 16 tokens and decode


def test_adjacent_rows_sharing_the_key_form_groups() -> None:
    shared = list(range(1, 21))
    lists = [shared + [50], shared + [51, 52], list(range(200, 230)), shared + [53, 54, 55],
             list(range(300, 305))]
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    row_group, first, rows, prefix = _rows(plan, 5)
    # rows 0-1 are a group; row 3 shares the key but is not adjacent to them
    assert row_group == [0, 0, NO_GROUP, NO_GROUP, NO_GROUP]
    assert (first[0], rows[0], prefix[0]) == (0, 2, 20)  # the shorter member, less its newest
    assert rows[1:] == [0] * 4


def test_large_groups_are_cut_at_the_row_limit_and_singletons_dropped() -> None:
    shared = list(range(1, 33))
    lists = [shared + [100 + i] for i in range(2 * CASCADE_MAX_ROWS + 1)]
    plan = plan_cascade(lists, min_prefix=16)
    assert plan is not None
    batch_size = len(lists)
    row_group, first, rows, _ = _rows(plan, batch_size)
    assert rows[:3] == [CASCADE_MAX_ROWS, CASCADE_MAX_ROWS, 0]  # the last row stays alone
    assert first[:2] == [0, CASCADE_MAX_ROWS]
    assert row_group[-1] == NO_GROUP and row_group[CASCADE_MAX_ROWS] == 1


def test_no_plan_without_sharing() -> None:
    assert plan_cascade([list(range(i * 50, i * 50 + 40)) for i in range(4)], 16) is None
    assert plan_cascade([[1, 2, 3], [1, 2, 3]], 16) is None  # shorter than the threshold


def test_rows_per_group_keep_the_query_tile_bounded() -> None:
    assert cascade_rows_per_group(16, 8) == CASCADE_MAX_ROWS  # Qwen3-0.6B: 2 heads per KV
    assert cascade_rows_per_group(28, 4) == 8  # 7 heads per KV head fill a tile of 8
    assert cascade_rows_per_group(64, 2) == 2
    assert cascade_rows_per_group(64, 1) == 1  # nothing to share: cascade stays off


def test_sorting_for_cascade_keeps_the_oldest_request_when_memory_runs_out() -> None:
    """Rows are sorted for grouping only after each got its slot, so the older request keeps
    growing and the newer one is preempted, as without cascade attention."""
    for min_prefix in (0, 16):
        scheduler = Scheduler(
            Config(max_running_requests=4, chunked_prefill_size=64, prefix_cache=False),
            num_slots=38, device=torch.device("cpu"), max_context_len=64,
            cascade_min_prefix=min_prefix,
        )
        old = Req(rid="old", prompt_ids=list(range(3, 33)),
                  params=SamplingParams(max_new_tokens=20), sink=lambda d: None)
        new = Req(rid="new", prompt_ids=list(range(3, 8)),
                  params=SamplingParams(max_new_tokens=20), sink=lambda d: None)
        scheduler.add(old)
        scheduler.add(new)
        steps = []
        for _ in range(4):
            plan = scheduler.schedule()
            assert plan is not None
            steps.append(sorted(r.rid for r in plan.reqs))
            for req in plan.sample_reqs:
                req.token_ids.append(5)
            scheduler.cache_prompts(plan, None)
            scheduler.release_finished(plan.sample_reqs)
        assert steps[-1] == ["old"], (min_prefix, steps)
        assert [r.rid for r in scheduler.waiting] == ["new"]


def test_decode_and_mixed_steps_carry_a_plan_over_their_one_token_requests() -> None:
    """Two requests sharing a cached prefix decode in a group next to one sharing nothing;
    while a fourth prompt is prefilled beside them (mixed steps) the plan covers the three
    one-token requests, in single_rows order, each of its rows 16-byte aligned on the device
    (three is odd: the rows are laid out padded)."""
    scheduler = Scheduler(
        Config(max_running_requests=8, chunked_prefill_size=16, prefix_cache=True),
        num_slots=400, device=torch.device("cpu"), max_context_len=256, cascade_min_prefix=16,
    )
    shared = list(range(3, 43))

    def request(rid: str, prompt: list[int]) -> Req:
        return Req(rid=rid, prompt_ids=prompt, params=SamplingParams(max_new_tokens=30),
                   sink=lambda d: None)

    scheduler.add(request("a", shared + [50]))
    scheduler.add(request("b", shared + [60, 61]))
    scheduler.add(request("d", list(range(200, 210))))
    kinds = []
    planned = 0  # steps whose batch carried a plan
    for step in range(40):
        if step == 12:
            scheduler.add(request("c", list(range(100, 160))))
        plan = scheduler.schedule()
        if plan is None:
            break
        batch = plan.batch
        assert batch is not None
        mixed = not batch.is_decode
        singles = [r.rid for r, n in zip(plan.reqs, batch.extend_lens) if n == 1]
        if batch.cascade is not None:
            planned += 1
            assert batch.cascade.shape == (4, len(singles))
            assert all(row.data_ptr() % 16 == 0 for row in batch.cascade)
            row_group = batch.cascade[0].tolist()
            grouped = {rid for rid, g in zip(singles, row_group) if g != NO_GROUP}
            assert grouped == {"a", "b"}
        if mixed and len(singles) == 3:
            assert batch.single_rows is not None and batch.cascade is not None
            # the plan's rows are the single rows, in their order
            assert [plan.reqs[i].rid for i in batch.single_rows[0].tolist()] == singles
            kinds.append("mixed with decodes")
        elif not mixed and batch.cascade is not None:
            kinds.append("grouped decode")
        for req in plan.sample_reqs:
            req.token_ids.append(5)
        scheduler.cache_prompts(plan, None)
        scheduler.release_finished(plan.sample_reqs)
    assert "mixed with decodes" in kinds and "grouped decode" in kinds
    stats = scheduler.stats
    assert stats.num_cascade_mixed_steps == kinds.count("mixed with decodes")
    assert stats.num_cascade_steps == planned >= len(kinds)
