"""SlotAllocator, RadixCache and PrefillCache: unit tests plus a stateful property test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backend.cache import (
    InsertResult,
    PrefillCache,
    RadixCache,
    RadixNode,
    SlotAllocator,
)

# ---------------------------------------------------------------------------- helpers


def make_cache(num_slots: int = 64, **limits: int | bool) -> RadixCache:
    return RadixCache(SlotAllocator(num_slots), **limits)  # type: ignore[arg-type]


def cache_seq(cache: RadixCache, tokens: list[int]) -> tuple[list[int], InsertResult]:
    """Allocate slots for `tokens`, insert them and free what the caller still owns."""
    slots = cache.allocator.alloc(len(tokens))
    assert slots is not None
    result = cache.insert(tokens, slots)
    cache.allocator.free(slots[: result.num_present] + slots[result.num_cached :])
    return slots, result


def node_depth(node: RadixNode) -> int:
    """Tokens from the root to the end of `node`'s edge."""
    depth = 0
    current: RadixNode | None = node
    while current is not None:
        depth += len(current.key)
        current = current.parent
    return depth


def path_nodes(cache: RadixCache, tokens: list[int]) -> list[RadixNode]:
    """Nodes whose edges `tokens` runs through, without touching the tree."""
    nodes: list[RadixNode] = []
    node, pos = cache.root, 0
    while pos < len(tokens) and tokens[pos] in node.children:
        node = node.children[tokens[pos]]
        nodes.append(node)
        pos += len(node.key)
    return nodes


def all_nodes(cache: RadixCache) -> list[RadixNode]:
    nodes, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children.values())
    return nodes


# ---------------------------------------------------------------------------- allocator


def test_allocator_hands_out_distinct_slots_and_counts() -> None:
    allocator = SlotAllocator(10)
    first = allocator.alloc(4)
    second = allocator.alloc(6)
    assert first is not None and second is not None
    assert sorted(first + second) == list(range(1, 11))
    assert (allocator.num_total, allocator.num_free, allocator.num_used) == (10, 0, 10)
    assert allocator.alloc(1) is None
    allocator.free(first)
    assert allocator.num_free == 4 and all(allocator.is_free(s) for s in first)
    assert not allocator.is_free(second[0]) and not allocator.is_free(0)
    assert allocator.alloc(5) is None and allocator.num_free == 4
    assert allocator.alloc(0) == [] and allocator.num_free == 4


@pytest.mark.parametrize("bad", [[0], [11], [-1], [3, 3]])
def test_allocator_rejects_bad_free_and_frees_nothing(bad: list[int]) -> None:
    allocator = SlotAllocator(10)
    assert allocator.alloc(10) is not None
    with pytest.raises(ValueError):
        allocator.free([5, *bad])
    assert allocator.num_free == 0


def test_allocator_double_free_raises() -> None:
    allocator = SlotAllocator(4)
    slots = allocator.alloc(2)
    assert slots is not None
    allocator.free(slots)
    with pytest.raises(ValueError, match="already free"):
        allocator.free(slots[:1])
    assert allocator.num_free == 4


# ---------------------------------------------------------------------------- radix: match/insert


def test_partial_match_splits_edge() -> None:
    cache = make_cache()
    slots, result = cache_seq(cache, [1, 2, 3, 4])
    assert result == InsertResult(0, 4) and cache.num_nodes == 1

    match = cache.match_prefix([1, 2, 9])
    assert match.slots == slots[:2]
    assert match.node.key == [1, 2] and node_depth(match.node) == 2
    assert cache.num_nodes == 2 and cache.num_leaves == 1
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots == slots
    assert cache.match_prefix([7]).slots == [] and cache.match_prefix([7]).node is cache.root
    assert cache.match_prefix([]).node is cache.root


@pytest.mark.parametrize("differs_at", [1, 63, 64, 65, 200, 2047, 2175])
def test_long_edge_splits_where_the_tokens_first_differ(differs_at: int) -> None:
    """A match ending deep inside a long edge (a shared system prompt, then a question of
    its own) splits it exactly at the first differing token, wherever that falls in the
    span the comparison halves."""
    cache = make_cache(num_slots=4096)
    prompt = list(range(1000, 3176))
    slots, _ = cache_seq(cache, prompt)
    other = prompt[:differs_at] + [7] + prompt[differs_at + 1 :]
    match = cache.match_prefix(other)
    assert match.slots == slots[:differs_at]
    assert node_depth(match.node) == differs_at


def test_insert_sharing_prefix_reports_present_and_keeps_caller_duplicates() -> None:
    cache = make_cache(num_slots=16)
    first, _ = cache_seq(cache, [1, 2, 3, 4])
    second = cache.allocator.alloc(4)
    assert second is not None
    result = cache.insert([1, 2, 5, 6], second)
    assert result == InsertResult(num_present=2, num_cached=4)
    assert sorted(cache.all_slots()) == sorted(first + second[2:])
    assert not any(cache.allocator.is_free(s) for s in second)  # the caller still owns [:2]
    cache.allocator.free(second[:2])
    assert cache.match_prefix([1, 2, 5, 6, 7]).slots == first[:2] + second[2:]
    assert cache.num_leaves == 2 and cache.total_size == 6

    again = cache.allocator.alloc(4)
    assert again is not None
    assert cache.insert([1, 2, 5, 6], again) == InsertResult(4, 4)
    assert cache.total_size == 6
    assert cache.insert([1, 2], again[:2]) == InsertResult(2, 2)
    assert cache.num_nodes == 3


def test_insert_ending_inside_an_edge_and_extra_slots() -> None:
    cache = make_cache(num_slots=16)
    slots, _ = cache_seq(cache, [1, 2, 3, 4])
    extra = cache.allocator.alloc(3)
    assert extra is not None
    assert cache.insert([1, 2], extra) == InsertResult(2, 2)
    assert cache.match_prefix([1, 2]).node.key == [1, 2]
    with pytest.raises(ValueError):
        cache.insert([5, 6, 7], extra[:2])
    assert cache.insert([5, 6], extra) == InsertResult(0, 2)
    assert cache.match_prefix([5, 6]).slots == extra[:2]
    assert cache.match_prefix([1, 2, 3, 4]).slots == slots


# ---------------------------------------------------------------------------- radix: eviction


def test_evict_takes_least_recently_used_leaf_first() -> None:
    cache = make_cache()
    a, _ = cache_seq(cache, [1, 1])
    b, _ = cache_seq(cache, [2, 2])
    c, _ = cache_seq(cache, [3, 3])
    cache.match_prefix([1, 1])  # a is now the most recent: b, c, a
    assert cache.evict(1) == 2
    assert all(cache.allocator.is_free(s) for s in b)
    assert cache.match_prefix([2, 2]).slots == []
    assert cache.evict(2) == 2
    assert cache.match_prefix([3, 3]).slots == [] and cache.match_prefix([1, 1]).slots == a
    assert cache.evict(100) == 2 and cache.total_size == 0
    assert cache.allocator.num_free == cache.allocator.num_total


def test_evict_continues_into_parent_that_becomes_leaf() -> None:
    cache = make_cache()
    cache_seq(cache, [1, 2, 3])
    cache_seq(cache, [1, 2, 4])
    assert (cache.num_nodes, cache.num_leaves) == (3, 2)
    assert cache.evict(4) == 4
    assert cache.total_size == 0 and cache.num_nodes == 0 and cache.num_leaves == 0


def test_lock_protects_path_and_unlock_releases_it() -> None:
    cache = make_cache()
    kept, _ = cache_seq(cache, [1, 2, 3, 4])
    cache_seq(cache, [1, 2, 7])
    cache_seq(cache, [5, 5])
    match = cache.match_prefix([1, 2, 3, 4])
    cache.lock(match.node)
    assert cache.protected_size == 4 and cache.evictable_size == 3
    assert cache.evict(100) == 3
    assert cache.match_prefix([1, 2, 3, 4]).slots == kept
    assert cache.reset() == 0 and cache.total_size == 4
    cache.unlock(match.node)
    assert cache.protected_size == 0 and cache.evictable_size == 4
    assert cache.reset() == 4 and cache.total_size == 0


def test_locked_inner_node_keeps_itself_but_not_its_children() -> None:
    cache = make_cache()
    slots, _ = cache_seq(cache, [1, 2, 3, 4])
    inner = cache.match_prefix([1, 2]).node
    cache.lock(inner)
    assert cache.protected_size == 2 and cache.evictable_size == 2
    assert cache.evict(10) == 2
    assert cache.match_prefix([1, 2, 3, 4]).slots == slots[:2]
    cache.unlock(inner)
    assert cache.evict(10) == 2


def test_unlock_below_zero_raises_and_stale_handle_rejected() -> None:
    cache = make_cache()
    cache_seq(cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    cache.lock(node)
    cache.unlock(node)
    with pytest.raises(ValueError):
        cache.unlock(node)
    assert node.ref_count == 0 and cache.evictable_size == 2
    cache.lock(cache.root)
    cache.unlock(cache.root)  # the root carries no count
    cache.reset()
    with pytest.raises(ValueError):
        cache.lock(node)


def test_token_budget_caps_evictable_tokens() -> None:
    cache = make_cache(token_budget=6)
    cache_seq(cache, [1, 1, 1])
    cache_seq(cache, [2, 2, 2])
    assert cache.evictable_size == 6
    cache_seq(cache, [3, 3, 3])
    assert cache.evictable_size == 6
    assert cache.match_prefix([1, 1, 1]).slots == []
    assert len(cache.match_prefix([2, 2, 2]).slots) == 3
    assert cache.allocator.num_used == 6


def test_max_leaves_caps_leaves_and_spares_locked() -> None:
    cache = make_cache(max_leaves=2)
    cache_seq(cache, [1])
    locked = cache.match_prefix([1]).node
    cache.lock(locked)
    cache_seq(cache, [2])
    cache_seq(cache, [3])
    assert cache.num_leaves == 2
    assert cache.match_prefix([1]).slots and not cache.match_prefix([2]).slots
    cache_seq(cache, [1, 4])  # extends the locked leaf: still two leaves
    assert cache.num_leaves == 2 and cache.match_prefix([3]).slots


def test_limit_spares_the_path_just_inserted() -> None:
    cache = make_cache(token_budget=3)
    slots, result = cache_seq(cache, [1, 2, 3, 4, 5])
    assert result == InsertResult(0, 5)
    match = cache.match_prefix([1, 2, 3, 4, 5])
    assert match.slots == slots
    cache_seq(cache, [9])
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots == [] and cache.evictable_size == 1


def test_max_tokens_per_seq_truncates_insert() -> None:
    cache = make_cache(max_tokens_per_seq=3)
    slots = cache.allocator.alloc(5)
    assert slots is not None
    assert cache.insert([1, 2, 3, 4, 5], slots) == InsertResult(0, 3)
    assert sorted(cache.all_slots()) == sorted(slots[:3])
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots == slots[:3]
    cache.allocator.free(slots[3:])
    assert cache.allocator.num_used == 3


def test_disabled_cache_takes_nothing() -> None:
    cache = make_cache(num_slots=8, enabled=False)
    slots = cache.allocator.alloc(3)
    assert slots is not None
    assert cache.insert([1, 2, 3], slots) == InsertResult(0, 0)
    match = cache.match_prefix([1, 2, 3])
    assert match.slots == [] and match.node is cache.root
    assert cache.total_size == 0 and cache.all_slots() == [] and cache.allocator.num_used == 3


def test_eviction_heap_stays_bounded_under_repeated_matches() -> None:
    cache = make_cache()
    for tokens in ([1, 2], [1, 3], [4]):
        cache_seq(cache, tokens)
    for i in range(2000):
        cache.match_prefix([[1, 2], [1, 3], [4]][i % 3])
    assert len(cache._heap) <= 2 * cache.num_nodes + 64
    cache.match_prefix([1, 3])
    cache.match_prefix([4])
    assert cache.evict(1) == 1 and len(cache.match_prefix([1, 2]).slots) == 1


# ---------------------------------------------------------------------------- prefill cache


def test_prefill_cache_lru_by_entries() -> None:
    cache = PrefillCache(max_entries=2, token_budget=0)
    cache.put([1], torch.tensor([1.0]))
    cache.put([2], torch.tensor([2.0]))
    assert cache.get([1]) is not None  # [2] is now the least recent
    cache.put([3], torch.tensor([3.0]))
    assert cache.get([2]) is None and len(cache) == 2
    hit = cache.get([1])
    assert hit is not None and hit.item() == 1.0
    assert cache.get([1, 2]) is None


def test_prefill_cache_token_budget() -> None:
    cache = PrefillCache(max_entries=10, token_budget=5)
    cache.put([1, 1], torch.zeros(3))
    cache.put([2, 2], torch.zeros(3))
    assert cache.num_tokens == 4
    cache.put([3, 3, 3], torch.zeros(3))
    assert cache.get([1, 1]) is None and cache.get([2, 2]) is not None
    assert cache.num_tokens == 5 and len(cache) == 2
    cache.put(list(range(6)), torch.zeros(3))
    assert cache.get(list(range(6))) is None and cache.num_tokens == 5
    cache.put([2, 2], torch.ones(3))
    refreshed = cache.get([2, 2])
    assert refreshed is not None and refreshed.sum().item() == 3 and cache.num_tokens == 5


def test_prefill_cache_stores_detached_copy_and_can_be_disabled() -> None:
    cache = PrefillCache(max_entries=2, token_budget=100)
    logits = torch.ones(4, requires_grad=True) * 2
    cache.put([7, 8], logits)
    hit = cache.get([7, 8])
    assert hit is not None and not hit.requires_grad and hit.device.type == "cpu"
    hit.zero_()
    again = cache.get([7, 8])
    assert again is not None and torch.equal(again, torch.full((4,), 2.0))
    on_device = cache.get([7, 8], torch.device("cpu"))  # the scheduler names its device
    assert on_device is not None and torch.equal(on_device, torch.full((4,), 2.0))
    on_device.zero_()
    stored = cache.get([7, 8])
    assert stored is not None and torch.equal(stored, torch.full((4,), 2.0))
    off = PrefillCache(max_entries=0, token_budget=100)
    off.put([7, 8], logits)
    assert off.get([7, 8]) is None and len(off) == 0


prompt_batches = st.lists(
    st.lists(st.tuples(st.lists(st.integers(0, 3), max_size=5), st.integers(0, 99)),
             max_size=9),
    min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(limits=st.sampled_from([(1, 0), (2, 0), (4, 0), (3, 7), (4, 12)]), batches=prompt_batches)
def test_prefill_cache_put_many_ends_as_puts_one_by_one(
    limits: tuple[int, int], batches: list[list[tuple[list[int], int]]]
) -> None:
    """Steps' batches of finished prompts leave the cache as putting them in order would:
    same entries, same logits, same recency order."""
    one_by_one, batched = PrefillCache(*limits), PrefillCache(*limits)
    for batch in batches:
        items = [(tokens, torch.tensor([float(value)])) for tokens, value in batch]
        for tokens, logits in items:
            one_by_one.put(tokens, logits)
        batched.put_many(items)
        assert list(batched._entries) == list(one_by_one._entries)
        assert all(torch.equal(batched._entries[k], one_by_one._entries[k])
                   for k in one_by_one._entries)
        assert batched.num_tokens == one_by_one.num_tokens


def test_prefill_cache_put_many_copies_only_what_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    import backend.cache as cache_module

    copied: list[float] = []
    real_copy = cache_module._host_copy

    def recording_copy(t: torch.Tensor) -> torch.Tensor:
        copied.append(t.item())
        return real_copy(t)

    monkeypatch.setattr(cache_module, "_host_copy", recording_copy)
    cache = PrefillCache(max_entries=2, token_budget=0)
    finished = [([i], torch.tensor([float(i)])) for i in range(64)]
    cache.put_many([*finished, ([62], torch.tensor([-1.0]))])
    assert copied == [63.0, -1.0]
    hit = cache.get([62])
    assert hit is not None and hit.item() == -1.0


# ---------------------------------------------------------------- stateful property test

NUM_SLOTS = 40
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=8)
indices = st.integers(0, 1_000)


@dataclass
class ModelReq:
    """A request as the scheduler keeps it: slots[:cached_len] are the tree's (locked)."""

    tokens: list[int]
    slots: list[int]
    cached_len: int
    node: RadixNode


class CacheMachine(RuleBasedStateMachine):
    """Drives the cache the way the scheduler does and checks every invariant after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = SlotAllocator(NUM_SLOTS)
        self.cache = RadixCache(self.allocator)
        self.requests: list[ModelReq] = []
        self.extra_locks: list[RadixNode] = []
        self.owned: set[int] = set()
        self.content: dict[int, tuple[int, ...]] = {}  # tree slot -> tokens its K/V encodes

    @initialize(
        enabled=st.sampled_from([True, True, True, False]),
        max_leaves=st.sampled_from([0, 0, 2, 4]),
        token_budget=st.sampled_from([0, 0, 6, 16]),
        max_tokens=st.sampled_from([0, 0, 5]),
    )
    def configure(self, enabled: bool, max_leaves: int, token_budget: int, max_tokens: int) -> None:
        self.cache = RadixCache(
            self.allocator,
            enabled=enabled,
            max_leaves=max_leaves,
            token_budget=token_budget,
            max_tokens_per_seq=max_tokens,
        )

    # -------------------------------------------------------------- helpers

    def _alloc(self, n: int) -> list[int] | None:
        if self.allocator.num_free < n:
            self.cache.evict(n - self.allocator.num_free)
        slots = self.allocator.alloc(n)
        if slots is not None:
            self.owned.update(slots)
        return slots

    def _free_owned(self, slots: list[int]) -> None:
        assert set(slots) <= self.owned
        self.allocator.free(slots)
        self.owned.difference_update(slots)

    def _check_match(self, tokens: list[int], slots: list[int], node: RadixNode) -> None:
        if not self.cache.enabled:
            assert slots == [] and node is self.cache.root
            return
        assert node_depth(node) == len(slots)
        for i, slot in enumerate(slots):
            assert self.content[slot] == tuple(tokens[: i + 1])
        cached = {self.content[s] for s in self.cache.all_slots()}
        assert len(slots) == len(tokens) or tuple(tokens[: len(slots) + 1]) not in cached

    def _insert(self, req: ModelReq) -> InsertResult:
        """Insert `req` and settle ownership; returns the result."""
        result = self.cache.insert(req.tokens, req.slots)
        assert req.cached_len <= result.num_present <= result.num_cached <= len(req.tokens)
        taken = req.slots[result.num_present : result.num_cached]
        self.owned.difference_update(taken)
        for i in range(result.num_present, result.num_cached):
            self.content[req.slots[i]] = tuple(req.tokens[: i + 1])
        self._free_owned(req.slots[req.cached_len : result.num_present])
        self._check_limits(req.tokens[: result.num_cached])
        return result

    def _check_limits(self, inserted: list[int]) -> None:
        cache = self.cache
        over = 0 < cache.max_leaves < cache.num_leaves
        over = over or 0 < cache.token_budget < cache.evictable_size
        if over:
            spared = {id(n) for n in path_nodes(cache, inserted)}
            for node in all_nodes(cache):
                if not node.children and node.ref_count == 0:
                    assert id(node) in spared

    # -------------------------------------------------------------- rules

    @rule(tokens=token_lists)
    def admit(self, tokens: list[int]) -> None:
        match = self.cache.match_prefix(tokens)
        self._check_match(tokens, match.slots, match.node)
        self.cache.lock(match.node)
        new = self._alloc(len(tokens) - len(match.slots))
        if new is None:
            self.cache.unlock(match.node)
            return
        self.requests.append(ModelReq(tokens, match.slots + new, len(match.slots), match.node))

    @precondition(lambda self: self.requests)
    @rule(idx=indices, more=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def decode(self, idx: int, more: list[int]) -> None:
        req = self.requests[idx % len(self.requests)]
        new = self._alloc(len(more))
        if new is not None:
            req.tokens += more
            req.slots += new

    @precondition(lambda self: self.requests)
    @rule(idx=indices)
    def finish(self, idx: int) -> None:
        req = self.requests.pop(idx % len(self.requests))
        result = self._insert(req)
        self._free_owned(req.slots[result.num_cached :])
        self.cache.unlock(req.node)

    @precondition(lambda self: self.requests)
    @rule(idx=indices)
    def cache_unfinished(self, idx: int) -> None:
        req = self.requests[idx % len(self.requests)]
        result = self._insert(req)
        match = self.cache.match_prefix(req.tokens)
        assert len(match.slots) == result.num_cached
        assert match.slots[: req.cached_len] == req.slots[: req.cached_len]
        start, end = result.num_present, result.num_cached
        assert match.slots[start:end] == req.slots[start:end]
        self.cache.lock(match.node)
        self.cache.unlock(req.node)
        req.slots = match.slots + req.slots[end:]
        req.cached_len, req.node = end, match.node

    @precondition(lambda self: self.requests)
    @rule(idx=indices)
    def abort(self, idx: int) -> None:
        req = self.requests.pop(idx % len(self.requests))
        self._free_owned(req.slots[req.cached_len :])
        self.cache.unlock(req.node)

    @rule(tokens=token_lists)
    def match(self, tokens: list[int]) -> None:
        result = self.cache.match_prefix(tokens)
        self._check_match(tokens, result.slots, result.node)

    @rule(tokens=token_lists)
    def lock_extra(self, tokens: list[int]) -> None:
        node = self.cache.match_prefix(tokens).node
        self.cache.lock(node)
        self.extra_locks.append(node)

    @precondition(lambda self: self.extra_locks)
    @rule(idx=indices)
    def unlock_extra(self, idx: int) -> None:
        self.cache.unlock(self.extra_locks.pop(idx % len(self.extra_locks)))

    @rule(idx=indices)
    def unlock_unlocked_raises(self, idx: int) -> None:
        free_nodes = [n for n in all_nodes(self.cache) if n.ref_count == 0]
        if not free_nodes:
            return
        node = free_nodes[idx % len(free_nodes)]
        with pytest.raises(ValueError):
            self.cache.unlock(node)
        assert node.ref_count == 0

    @rule(num_tokens=st.integers(0, 20))
    def evict(self, num_tokens: int) -> None:
        before = self.cache.evictable_size
        freed = self.cache.evict(num_tokens)
        assert freed >= min(num_tokens, before)
        assert self.cache.evictable_size == before - freed
        assert freed >= num_tokens or self.cache.evictable_size == 0

    @rule()
    def reset(self) -> None:
        before = self.cache.evictable_size
        assert self.cache.reset() == before
        assert self.cache.evictable_size == 0
        assert all(n.ref_count > 0 for n in all_nodes(self.cache))

    # -------------------------------------------------------------- invariants

    @invariant()
    def every_slot_accounted_once(self) -> None:
        tree = self.cache.all_slots()
        tree_set = set(tree)
        free = {s for s in range(1, NUM_SLOTS + 1) if self.allocator.is_free(s)}
        assert len(tree) == len(tree_set)
        assert not tree_set & self.owned
        assert not free & (tree_set | self.owned)
        assert free | tree_set | self.owned == set(range(1, NUM_SLOTS + 1))
        assert len(free) == self.allocator.num_free
        assert self.allocator.num_free + self.allocator.num_used == self.allocator.num_total
        assert len(self.owned) + len(tree) == self.allocator.num_used

    @invariant()
    def tree_structure_refs_and_sizes(self) -> None:
        cache = self.cache
        expected: dict[int, int] = {}
        for handle in [r.node for r in self.requests] + self.extra_locks:
            current: RadixNode | None = handle
            while current is not None and current is not cache.root:
                expected[id(current)] = expected.get(id(current), 0) + 1
                current = current.parent
        evictable = protected = leaves = 0
        nodes = all_nodes(cache)
        for node in nodes:
            assert node.ref_count == expected.get(id(node), 0) >= 0
            assert node.key and len(node.key) == len(node.value)
            assert node.parent is not None and node.parent.children[node.key[0]] is node
            if node.ref_count:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            leaves += not node.children
        assert (cache.evictable_size, cache.protected_size) == (evictable, protected)
        assert cache.evictable_size + cache.protected_size == cache.total_size
        assert cache.total_size == len(cache.all_slots())
        assert (cache.num_leaves, cache.num_nodes) == (leaves, len(nodes))

    @invariant()
    def requests_see_their_tokens(self) -> None:
        for req in self.requests:
            assert len(req.slots) == len(req.tokens)
            assert node_depth(req.node) == req.cached_len
            for i in range(req.cached_len):
                assert self.content[req.slots[i]] == tuple(req.tokens[: i + 1])
            assert set(req.slots[req.cached_len :]) <= self.owned


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
