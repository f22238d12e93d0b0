"""KV-slot bookkeeping: the slot allocator, the radix prefix cache and the prefill cache.

Pages are one token: each token's K/V lives in one slot of the KV pool, slots 1..N (slot 0
is the pool's padding slot and is never handed out). The scheduler is the only caller.

Invariants of `RadixCache` (the tests check every one after every step):

| what                 | holds                                                                |
|----------------------|----------------------------------------------------------------------|
| slot ownership       | every slot is free, held by the tree, or held by a caller: once       |
| edges                | a non-root node's `key` is non-empty, `len(key) == len(value)`,       |
|                      | and its parent keys it by `key[0]`                                    |
| ref counts           | `node.ref_count` = locks held on the node or on any node below it    |
| sizes                | evictable_size = tokens of nodes with ref_count 0; protected = rest  |
| handles              | a node keeps its end position in the token sequence when edges split |
| eviction heap        | every unreferenced leaf has an entry stamped with its last_access;   |
|                      | entries that no longer match are skipped when popped                 |
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


class SlotAllocator:
    """Hands out KV slots 1..num_slots; O(n) in the slots moved per call."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self._num_slots = num_slots
        self._free_stack: list[int] = list(range(num_slots, 0, -1))
        self._free_flags = bytearray(b"\x01") * (num_slots + 1)
        self._free_flags[0] = 0

    @property
    def num_total(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    @property
    def num_used(self) -> int:
        return self._num_slots - len(self._free_stack)

    def alloc(self, n: int) -> list[int] | None:
        """Take `n` distinct free slots, or return None (taking nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > len(self._free_stack):
            return None
        if n == 0:
            return []
        slots = self._free_stack[-n:]
        del self._free_stack[-n:]
        slots.reverse()
        for slot in slots:
            self._free_flags[slot] = 0
        return slots

    def free(self, slots: Sequence[int]) -> None:
        """Return `slots`; on slot 0, out of range or double free: ValueError, nothing freed."""
        for slot in slots:
            if not 1 <= slot <= self._num_slots:
                raise ValueError(f"slot {slot} is outside 1..{self._num_slots}")
            if self._free_flags[slot]:
                raise ValueError(f"slot {slot} is already free")
        if len(set(slots)) != len(slots):
            raise ValueError("the same slot appears twice in one free")
        for slot in slots:
            self._free_flags[slot] = 1
        self._free_stack.extend(slots)

    def is_free(self, slot: int) -> bool:
        return 1 <= slot <= self._num_slots and bool(self._free_flags[slot])


class RadixNode:
    """One edge of the radix tree: tokens `key` whose K/V sit in slots `value`.

    A node stands for the token sequence from the root down to the end of its edge; that end
    position never changes (a split inserts the new node above), so a node is a stable
    handle for `RadixCache.lock` / `unlock` until it is evicted.
    """

    __slots__ = ("key", "value", "children", "parent", "ref_count", "last_access", "node_id")

    def __init__(
        self, key: list[int], value: list[int], parent: RadixNode | None, node_id: int
    ) -> None:
        self.key = key
        self.value = value
        self.children: dict[int, RadixNode] = {}
        self.parent = parent
        self.ref_count = 0
        self.last_access = 0
        self.node_id = node_id

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"RadixNode(id={self.node_id}, len={len(self.key)}, ref={self.ref_count})"


@dataclass
class MatchResult:
    slots: list[int]  # KV slots of the longest cached prefix of the query, in token order
    node: RadixNode  # deepest node covering that prefix (the root when nothing matched)


@dataclass
class InsertResult:
    num_present: int  # leading tokens already in the tree before this insert
    num_cached: int  # leading tokens of the sequence the tree now holds


def _common_prefix_len(key: list[int], tokens: list[int], start: int) -> int:
    """Length of the common prefix of `key` and tokens[start:]: list slices compared in C,
    halving the span that holds the first difference, then a short loop over it."""
    n = min(len(key), len(tokens) - start)
    if key[:n] == tokens[start : start + n]:
        return n
    lo, hi = 0, n  # key[:lo] matches; the first difference lies in [lo, hi)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if key[lo:mid] == tokens[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if key[i] != tokens[start + i]:
            return i
    return hi


class RadixCache:
    """Prefix cache over KV slots: a radix tree of token edges with ref counts and LRU eviction.

    Usage by the scheduler: `match_prefix` a prompt and `lock` the returned node while the
    request uses those slots; `insert` the request's tokens and slots when a chunk or the
    whole request is done, then `unlock` the old node. `evict` frees unreferenced
    least-recently-used leaves when the allocator runs short.

    Limits, enforced after every insert by evicting LRU unreferenced leaves (never a
    referenced node, nor the path the insert just wrote, so the caller may match and lock it
    right after; a limit that only path exceeds is met by the next insert or evict):
    `max_leaves` > 0 caps the number of leaves, `token_budget` > 0 caps evictable_size,
    `max_tokens_per_seq` > 0 truncates each inserted sequence to that many tokens.
    """

    def __init__(
        self,
        allocator: SlotAllocator,
        *,
        enabled: bool = True,
        max_leaves: int = 0,
        max_tokens_per_seq: int = 0,
        token_budget: int = 0,
    ) -> None:
        for name, value in (
            ("max_leaves", max_leaves),
            ("max_tokens_per_seq", max_tokens_per_seq),
            ("token_budget", token_budget),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.allocator = allocator
        self.enabled = enabled
        self.max_leaves = max_leaves
        self.max_tokens_per_seq = max_tokens_per_seq
        self.token_budget = token_budget
        self._node_ids = itertools.count()
        self._root = RadixNode([], [], None, next(self._node_ids))
        self._clock = 0
        self._heap: list[tuple[int, int, RadixNode]] = []
        self._num_nodes = 0
        self._num_leaves = 0
        self._evictable_size = 0
        self._protected_size = 0

    # ---------------------------------------------------------------- sizes

    @property
    def root(self) -> RadixNode:
        return self._root

    @property
    def evictable_size(self) -> int:
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        return self._protected_size

    @property
    def total_size(self) -> int:
        return self._evictable_size + self._protected_size

    @property
    def num_leaves(self) -> int:
        return self._num_leaves

    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, the root excluded."""
        return self._num_nodes

    def all_slots(self) -> list[int]:
        """Every slot the tree holds, in no particular order."""
        return [slot for node in self._nodes() for slot in node.value]

    # ---------------------------------------------------------------- interface

    def match_prefix(self, tokens: Sequence[int]) -> MatchResult:
        """Slots of the longest cached prefix of `tokens`; refreshes the path's LRU time.

        When the match ends inside an edge, the edge is split so that `node` ends exactly
        at the match. The slots stay the tree's: lock `node` to keep them while in use.
        """
        if not self.enabled:
            return MatchResult([], self._root)
        node, slots = self._walk(list(tokens))
        self._touch(node)
        return MatchResult(slots, node)

    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> InsertResult:
        """Add `tokens` (slots[i] holds token i's K/V) to the tree.

        Ownership: the tree takes slots[num_present:num_cached]. The caller keeps every slot
        it owned at positions < num_present (they duplicate tree content: it frees those that
        did not come from an earlier match) and at positions >= num_cached (beyond
        truncation). The tree never frees a slot it does not own. `slots` may be longer than
        `tokens`; the extra slots stay the caller's. Disabled: takes nothing, returns (0, 0).
        """
        if not self.enabled:
            return InsertResult(0, 0)
        if len(slots) < len(tokens):
            raise ValueError(f"{len(tokens)} tokens but only {len(slots)} slots")
        num_cached = len(tokens)
        if self.max_tokens_per_seq:
            num_cached = min(num_cached, self.max_tokens_per_seq)
        key = list(tokens[:num_cached])
        node, present = self._walk(key)
        num_present = len(present)
        if num_present < num_cached:
            node = self._add_leaf(node, key[num_present:], list(slots[num_present:num_cached]))
        self._touch(node)
        self._enforce_limits(spare=node)
        return InsertResult(num_present, num_cached)

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction (ref count +1 each; root ignored)."""
        self._check_attached(node)
        for current in self._path_up(node):
            if current.ref_count == 0:
                self._evictable_size -= len(current.key)
                self._protected_size += len(current.key)
            current.ref_count += 1

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`; raises ValueError if `node` is not locked."""
        self._check_attached(node)
        if node is not self._root and node.ref_count == 0:
            raise ValueError(f"unlock of {node}, which is not locked")
        for current in self._path_up(node):
            current.ref_count -= 1
            if current.ref_count == 0:
                self._protected_size -= len(current.key)
                self._evictable_size += len(current.key)
                self._push_candidate(current)

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from LRU unreferenced leaves; returns slots freed.

        Fewer are freed only when nothing unreferenced is left. A parent whose last child
        goes becomes a candidate itself.
        """
        freed = 0
        while freed < num_tokens:
            leaf = self._pop_lru_leaf()
            if leaf is None:
                break
            freed += self._remove_leaf(leaf)
        return freed

    def reset(self) -> int:
        """Evict everything unreferenced; returns the number of slots freed."""
        freed = self.evict(self._evictable_size)
        logger.debug("radix cache flushed: %d slots freed, %d locked", freed, self.total_size)
        return freed

    # ---------------------------------------------------------------- tree walking

    def _walk(self, tokens: list[int]) -> tuple[RadixNode, list[int]]:
        """Follow `tokens` from the root, splitting the edge where the match ends inside it."""
        node = self._root
        slots: list[int] = []
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            matched = _common_prefix_len(child.key, tokens, pos)
            if matched < len(child.key):
                child = self._split(child, matched)
            slots.extend(child.value)
            node = child
            pos += matched
        return node, slots

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child`'s edge after `at` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = RadixNode(child.key[:at], child.value[:at], parent, next(self._node_ids))
        upper.ref_count = child.ref_count
        upper.last_access = child.last_access
        upper.children[child.key[at]] = child
        parent.children[child.key[0]] = upper
        child.key = child.key[at:]
        child.value = child.value[at:]
        child.parent = upper
        self._num_nodes += 1
        return upper

    def _add_leaf(self, parent: RadixNode, key: list[int], value: list[int]) -> RadixNode:
        leaf = RadixNode(key, value, parent, next(self._node_ids))
        if parent is self._root or parent.children:
            self._num_leaves += 1
        parent.children[key[0]] = leaf
        self._num_nodes += 1
        self._evictable_size += len(key)
        return leaf

    def _remove_leaf(self, leaf: RadixNode) -> int:
        parent = leaf.parent
        assert parent is not None and leaf.is_leaf and leaf.ref_count == 0
        del parent.children[leaf.key[0]]
        leaf.parent = None
        self.allocator.free(leaf.value)
        self._num_nodes -= 1
        self._evictable_size -= len(leaf.key)
        if parent is not self._root and parent.is_leaf:
            self._push_candidate(parent)
        else:
            self._num_leaves -= 1
        return len(leaf.value)

    def _touch(self, node: RadixNode) -> None:
        self._clock += 1
        for current in self._path_up(node):
            current.last_access = self._clock
        self._push_candidate(node)

    def _path_up(self, node: RadixNode) -> Iterator[RadixNode]:
        """`node` and its ancestors, the root excluded."""
        current: RadixNode | None = node
        while current is not None and current is not self._root:
            yield current
            current = current.parent

    def _nodes(self) -> Iterator[RadixNode]:
        """Every node but the root, parents before children."""
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _check_attached(self, node: RadixNode) -> None:
        if node.parent is None and node is not self._root:
            raise ValueError(f"{node} is no longer in the tree")

    # ---------------------------------------------------------------- eviction

    def _is_candidate(self, node: RadixNode) -> bool:
        return node.parent is not None and node.is_leaf and node.ref_count == 0

    def _push_candidate(self, node: RadixNode) -> None:
        if not self._is_candidate(node):
            return
        heapq.heappush(self._heap, (node.last_access, node.node_id, node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [
            (node.last_access, node.node_id, node)
            for node in self._nodes()
            if self._is_candidate(node)
        ]
        heapq.heapify(self._heap)

    def _pop_lru_leaf(self) -> RadixNode | None:
        while self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if stamp == node.last_access and self._is_candidate(node):
                return node
        return None

    def _over_limits(self, spared_tokens: int = 0) -> bool:
        too_many_leaves = 0 < self.max_leaves < self._num_leaves
        too_many_tokens = 0 < self.token_budget < self._evictable_size + spared_tokens
        return too_many_leaves or too_many_tokens

    def _enforce_limits(self, spare: RadixNode) -> None:
        """Evict until within limits, sparing `spare`'s path by locking it meanwhile."""
        if not self._over_limits():
            return
        protected_before = self._protected_size
        self.lock(spare)
        spared_tokens = self._protected_size - protected_before
        try:
            while self._over_limits(spared_tokens):
                leaf = self._pop_lru_leaf()
                if leaf is None:
                    break
                self._remove_leaf(leaf)
        finally:
            self.unlock(spare)


class PrefillCache:
    """Exact-match cache of whole prompts: last-position logits, LRU, bounded by entries and
    total prompt tokens (`token_budget` 0 = bounded by entries only)."""

    def __init__(self, max_entries: int, token_budget: int) -> None:
        if max_entries < 0 or token_budget < 0:
            raise ValueError("max_entries and token_budget must be >= 0")
        self.max_entries = max_entries
        self.token_budget = token_budget
        self._entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._num_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def get(self, tokens: Sequence[int], device: torch.device | None = None
            ) -> torch.Tensor | None:
        """A copy on `device` (default: the CPU) of the logits stored for exactly `tokens`,
        or None; marks it recent. To a device the copy is queued on its stream: an entry
        whose own copy from the GPU is still landing (see `_host_copy`) is never read by the
        CPU, whose read could see it half written."""
        if not self.max_entries:
            return None
        key = tuple(tokens)
        logits = self._entries.get(key)
        if logits is None:
            return None
        self._entries.move_to_end(key)
        if device is None or device.type == "cpu":
            return logits.clone()
        return logits.to(device, non_blocking=True)

    def put(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """Store a detached CPU copy of `logits` for `tokens`, evicting LRU entries to fit."""
        self.put_many([(tokens, logits)])

    def put_many(self, items: Sequence[tuple[Sequence[int], torch.Tensor]]) -> None:
        """`put` each item in order, copying only the logits of those that stay: the last
        `max_entries` distinct prompts that fit (a step finishing 64 prompts copies 4)."""
        if not self.max_entries:
            return
        staying: list[tuple[tuple[int, ...], torch.Tensor]] = []
        seen: set[tuple[int, ...]] = set()
        for tokens, logits in reversed(items):
            if len(staying) == self.max_entries:
                break
            if not tokens or (self.token_budget and len(tokens) > self.token_budget):
                continue
            key = tuple(tokens)
            if key not in seen:
                seen.add(key)
                staying.append((key, logits))
        for key, logits in reversed(staying):
            self._put(key, logits)

    def _put(self, key: tuple[int, ...], logits: torch.Tensor) -> None:
        if self._entries.pop(key, None) is not None:
            self._num_tokens -= len(key)
        self._entries[key] = _host_copy(logits.detach())
        self._num_tokens += len(key)
        while len(self._entries) > self.max_entries or (
            self.token_budget and self._num_tokens > self.token_budget
        ):
            old_key, _ = self._entries.popitem(last=False)
            self._num_tokens -= len(old_key)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._num_tokens = 0


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t` that does not wait for the device: on CUDA it lands in pinned memory
    behind the work already queued, and is only ever read back through stream-ordered copies
    to the device (a later prefill-cache hit), which run after it."""
    if t.device.type != "cuda":
        return t.to("cpu", copy=True)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
