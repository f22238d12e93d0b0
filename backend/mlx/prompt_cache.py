"""KV caches of finished sequences, kept so that the next turn of a conversation (or any
prompt sharing their start) prefills only what is new.

An entry is a sequence's tokens and its mlx-lm cache (one object per layer, covering exactly
those tokens). `take(ids)` finds the entry sharing the longest prefix with `ids` and hands
out a cache of that prefix: the entry itself when `ids` extends all of it (a conversation
goes on; the finished turn will put a longer entry back), else a trimmed copy (the entry
stays for others). At least one token of `ids` is always left to compute, since the model
must see the last prompt token to sample. Entries are evicted least recently used first,
beyond `max_entries` or `max_tokens`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


@dataclass
class CacheEntry:
    tokens: list[int]
    cache: list[Any]


class PromptCache:
    """An LRU of sequence caches, bounded by entries and tokens (0 = no token bound)."""

    def __init__(self, max_entries: int, max_tokens: int = 0) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._keys = count()
        self.num_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in list(self._entries.values()))

    def take(self, ids: list[int]) -> tuple[list[Any] | None, int]:
        """A cache of the longest cached prefix of `ids` and its length; (None, 0) if none."""
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            shared = _common_prefix(entry.tokens, ids)
            if shared > best_len:
                best_key, best_len = key, shared
        usable = min(best_len, len(ids) - 1)
        if best_key is None or usable <= 0:
            return None, 0
        entry = self._entries[best_key]
        if usable == len(entry.tokens):
            del self._entries[best_key]
            self.num_hits += 1
            return entry.cache, usable
        if not can_trim_prompt_cache(entry.cache):
            return None, 0
        cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - usable)
        self._entries.move_to_end(best_key)
        self.num_hits += 1
        return cache, usable

    def put(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep `cache` (covering `tokens`); entries it extends are dropped."""
        if self.max_entries == 0 or not tokens:
            return
        if self.max_tokens and len(tokens) > self.max_tokens:
            return
        for key in [k for k, e in self._entries.items()
                    if _common_prefix(e.tokens, tokens) == len(e.tokens)]:
            del self._entries[key]
        self._entries[next(self._keys)] = CacheEntry(list(tokens), cache)
        while len(self._entries) > self.max_entries or (
            self.max_tokens and self.num_tokens > self.max_tokens
        ):
            self._entries.popitem(last=False)

    def clear(self) -> int:
        """Drop every entry; returns the tokens they held."""
        freed = self.num_tokens
        self._entries.clear()
        return freed


def _common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit
