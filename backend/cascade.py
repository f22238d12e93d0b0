"""Cascade decode attention: the host's part, grouping one-token requests that share a KV
prefix.

Requests whose prompts share a cached prefix hold the same radix-cache slots for it, so their
decode attention reads the same keys and values. A kernel set with cascade attention reads
such a prefix once per group of rows and each row's own suffix separately, then merges the
two (as split-K merges its slices). The host only proposes groups; the device measures how
long the shared prefix really is, so a proposal can cost time but never correctness.

A plan covers a batch's B one-token requests (a decode batch's rows; a mixed batch's
`single_rows`, in their order) as an int64 [4, B] table (`ForwardBatch.cascade`; on the
device a row-strided view, `backend.batch.plan_view`):

- row 0, `row_group[b]`: the group of batch row b, or -1;
- row 1, `group_first[g]`: the first batch row of group g; its members are the consecutive
  rows `group_first[g] .. group_first[g] + group_rows[g] - 1`;
- row 2, `group_rows[g]`: the group's row count, 2..`cascade_rows_per_group` (0 past the last
  group);
- row 3, `group_prefix[g]`: an upper bound on the shared prefix (every member's length less
  its newest token), which the device lowers to the longest common prefix of the members'
  slot lists before attention reads it.

Groups never have fewer than two rows, so at most B // 2 exist.
"""

from __future__ import annotations

from collections.abc import Sequence

CASCADE_MAX_ROWS = 16
CASCADE_TILE_ROWS = 64  # query rows (group members x query heads per KV head) per prefix tile
NO_GROUP = -1


def cascade_rows_per_group(num_q_heads: int, num_kv_heads: int) -> int:
    """Most rows in one group for a model's head layout: as many as fit the prefix kernel's
    query tile (all of a KV head's query heads per row), at most CASCADE_MAX_ROWS; below 2,
    cascade attention has nothing to share."""
    heads_per_kv = 1 << max(0, (num_q_heads // num_kv_heads - 1).bit_length())
    return min(CASCADE_MAX_ROWS, CASCADE_TILE_ROWS // heads_per_kv)


def cascade_key(slots: Sequence[int], min_prefix: int) -> int:
    """Sort key that brings together requests sharing their first `min_prefix` slots: the
    slot at position `min_prefix - 1` (requests sharing that slot share the radix path to
    it), or -1 for requests too short to share that much."""
    return slots[min_prefix - 1] if len(slots) > min_prefix else NO_GROUP


def plan_cascade(
    slot_lists: Sequence[Sequence[int]], min_prefix: int, max_rows: int = CASCADE_MAX_ROWS
) -> list[int] | None:
    """The flat [4 * B] plan (module docstring) of B one-token requests, row b attending
    `slot_lists[b]` (its newest token's slot last), in groups of at most `max_rows`, or None
    when no two adjacent rows have the same `cascade_key`. Rows with equal keys should be
    adjacent (sort them by the key)."""
    batch_size = len(slot_lists)
    row_group = [NO_GROUP] * batch_size
    group_first = [0] * batch_size
    group_rows = [0] * batch_size
    group_prefix = [0] * batch_size
    num_groups = 0
    start = 0
    keys = [cascade_key(slots, min_prefix) for slots in slot_lists]
    while start < batch_size:
        end = start + 1
        while (end < batch_size and end - start < max_rows
               and keys[end] != NO_GROUP and keys[end] == keys[start]):
            end += 1
        if end - start >= 2:
            row_group[start:end] = [num_groups] * (end - start)
            group_first[num_groups] = start
            group_rows[num_groups] = end - start
            group_prefix[num_groups] = min(len(slot_lists[b]) for b in range(start, end)) - 1
            num_groups += 1
        start = end
    if num_groups == 0:
        return None
    return row_group + group_first + group_rows + group_prefix
