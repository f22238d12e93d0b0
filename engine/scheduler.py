"""Continuous batching: which requests run this step, and how many of their tokens.

There are no prefill and decode phases. Each step moves every scheduled request's computed
tokens toward its known tokens (prompt + generated) within a token budget:

1. running requests that decode (one pending token each) go first;
2. running requests in the middle of a chunked prefill (or resumed after preemption) get
   what is left of the budget, oldest first;
3. waiting requests are admitted while slots, budget and MAX_RUNNING_REQUESTS allow: their
   prompt is matched in the radix cache and only the rest is computed.

The scheduler mirrors every running request's slots into a device-resident `SlotTable`
(one row each, assigned at admission and freed at release): a step stages only the slots
that changed, and the runner's KV index list is gathered on the device from it.

When slots run out, the radix cache evicts unreferenced prefixes; when that is not enough,
the newest running requests are preempted: their computed tokens go into the radix cache
(so a resume usually recomputes nothing), their slots are released, and they wait again
with their generated tokens kept. The scheduler is the only caller of the caches.

Overlap scheduling: a request may carry a future token (`Req.num_future`), sampled by the
step still running on the device. It is scheduled like any pending token; its input row is
listed in `StepPlan.future_inputs` for the engine to fill on the device. A future token that
ends the request by length is not scheduled, and a waiting request with one is admitted
once it has been read.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from backend.batch import (
    ForwardBatch,
    build_forward_batch_from_table,
    build_one_token_batch_from_table,
)
from backend.cache import PrefillCache, RadixCache, RadixNode, SlotAllocator
from backend.cascade import CASCADE_MAX_ROWS, cascade_key, plan_cascade
from backend.slot_table import SlotTable
from config import Config
from engine.request import FUTURE_TOKEN, Req

logger = logging.getLogger(__name__)

IN_BATCH_PREFIX_MIN = 32  # shared tokens that make a request wait for another's prefill
PREFIX_ROW_SEARCH = 64  # tree nodes `_prefix_row` looks at for a row to copy a prefix from


@dataclass
class StepPlan:
    """What one step runs. Built by `Scheduler.schedule`, read-only afterwards."""

    reqs: list[Req]  # requests in the forward batch, in batch order
    starts: list[int]  # num_computed of each before this step
    batch: ForwardBatch | None
    sample_reqs: list[Req]  # forward rows first (batch order), then prefill-cache hits
    cached_logits: list[torch.Tensor] = field(default_factory=list)
    future_inputs: list[tuple[int, Req]] = field(default_factory=list)  # (input row, request)

    @property
    def num_forward_tokens(self) -> int:
        return self.batch.num_tokens if self.batch is not None else 0


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_prefill_cache_hits: int = 0
    num_cascade_steps: int = 0  # steps whose batch carried a cascade plan
    num_cascade_mixed_steps: int = 0  # of them, steps that also prefilled


class Scheduler:
    def __init__(
        self,
        config: Config,
        num_slots: int,
        device: torch.device,
        max_context_len: int | None = None,
        cascade_min_prefix: int = 0,
        cascade_max_rows: int = CASCADE_MAX_ROWS,
    ) -> None:
        """`num_slots` usable KV slots; `max_context_len` (the model's) caps the slot table's
        width, which the pool size caps too. With `cascade_min_prefix`, decode rows sharing
        that many leading slots are brought together and their batch carries a cascade
        plan (backend/cascade.py) of groups of up to `cascade_max_rows`."""
        self.config = config
        self.cascade_min_prefix = cascade_min_prefix
        self.cascade_max_rows = cascade_max_rows
        self.device = device
        self.step_budget = config.resolved_chunked_prefill_size(device)
        self.allocator = SlotAllocator(num_slots)
        self.max_context_len = max_context_len or num_slots
        width = num_slots if max_context_len is None else min(num_slots, max_context_len)
        self.table = SlotTable(config.max_running_requests, width, device)
        self.radix = RadixCache(
            self.allocator,
            enabled=config.prefix_cache,
            max_leaves=config.prefix_cache_size,
            max_tokens_per_seq=config.prefix_cache_max_tokens,
            token_budget=config.prefix_cache_token_budget,
        )
        self._holders: dict[int, Req] = {}  # node id -> a running request holding it
        self.prefill_cache = PrefillCache(
            config.prefill_cache_size if config.prefix_cache else 0,
            config.prefill_cache_token_budget,
        )
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ queues
    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def remove(self, req: Req) -> None:
        """Take `req` out of the queues, releasing its KV (abort)."""
        if req in self.running:
            self.running.remove(req)
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def drop_all(self) -> list[Req]:
        """After a step failed: every request out of the queues with none of its KV cached
        (the failed step's K/V was never written), then both caches flushed, since prompts
        cached right after that step's launch may hold unwritten slots. Returns the
        requests."""
        dropped = self.running + list(self.waiting)
        for req in dropped:  # a waiting one holds nothing, unless the step failed admitting it
            if req.slots or req.row or req.node is not None:
                self.allocator.free(req.slots[req.cached_len :])
                self._unhold(req)
        self.running.clear()
        self.waiting.clear()
        self.flush_cache()
        return dropped

    def flush_cache(self) -> int:
        """Drop every unreferenced prefix from both caches; returns the freed slots."""
        self.prefill_cache.clear()
        return self.radix.reset()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan | None:
        budget = self.step_budget
        # Prompts not yet computed before this step reach the radix cache after it at the
        # earliest: requests sharing them wait (their chunks below count this step's work).
        uncached = [r.token_ids for r in self.running if r.num_computed < len(r.prompt_ids)]
        decoding: list[Req] = []
        prefilling: list[Req] = []
        for req in self.running:
            pending = req.num_pending
            if pending == 1 and not req.future_is_last(self.max_context_len):
                decoding.append(req)
            elif pending > 1:
                prefilling.append(req)
        prefilling.sort(key=lambda r: r.arrival)
        scheduled = self._grow_decoding(decoding)
        done = {id(r) for r, _ in scheduled}
        budget -= len(scheduled)
        if self.cascade_min_prefix:  # rows sharing a prefix side by side (backend/cascade.py)
            scheduled.sort(key=lambda e: cascade_key(e[0].slots, self.cascade_min_prefix))
        for req in prefilling:
            if budget <= 0:
                break
            if req.node is None:  # preempted earlier in this step
                continue
            n = min(req.num_pending, budget)
            if self._grow(req, n, done):
                scheduled.append((req, n))
                done.add(id(req))
                budget -= n
        sample_hits: list[tuple[Req, torch.Tensor]] = []
        if budget > 0:
            self._admit(budget, scheduled, sample_hits, uncached)
        if not scheduled and not sample_hits:
            return None
        return self._plan(scheduled, sample_hits)

    def _grow_decoding(self, decoding: list[Req]) -> list[tuple[Req, int]]:
        """A slot for each decoding request's next token: in one allocation when the pool
        has them all (the usual case), else one by one, oldest first (they keep their slots
        when memory runs out), preempting newer requests."""
        slots = self._alloc(len(decoding)) if decoding else None
        if slots is not None:
            starts = [len(r.slots) for r in decoding]
            for req, slot in zip(decoding, slots):
                req.slots.append(slot)
            self.table.append([r.row for r in decoding], starts, slots)
            return [(r, 1) for r in decoding]
        scheduled: list[tuple[Req, int]] = []
        done: set[int] = set()
        for req in decoding:
            if req.node is None:  # preempted earlier in this step
                continue
            if self._grow(req, 1, done):
                scheduled.append((req, 1))
                done.add(id(req))
        return scheduled

    def _plan(
        self, scheduled: list[tuple[Req, int]], hits: list[tuple[Req, torch.Tensor]]
    ) -> StepPlan:
        reqs = [r for r, _ in scheduled]
        if reqs and not hits and all(n == 1 for _, n in scheduled):
            return self._one_token_plan(reqs, scheduled)
        starts = [r.num_computed - n for r, n in scheduled]
        batch = None
        future_inputs: list[tuple[int, Req]] = []
        if scheduled:
            token_ids = [r.step_tokens(s, n) for (r, n), s in zip(scheduled, starts)]
            row = 0
            for (req, n), start in zip(scheduled, starts):
                if start + n > len(req.token_ids):  # its last input is the future token
                    future_inputs.append((row + n - 1, req))
                row += n
            batch = build_forward_batch_from_table(
                token_ids=token_ids,
                prefix_lens=starts,
                out_slots=[r.slots[s : s + n] for (r, n), s in zip(scheduled, starts)],
                rows=[r.row for r in reqs],
                sample_mask=[r.num_pending == 0 for r in reqs],
                table=self.table,
                cascade=self._cascade_plan(scheduled),
            )
        sample_reqs = [r for r in reqs if r.num_pending == 0] + [r for r, _ in hits]
        return StepPlan(
            reqs=reqs,
            starts=starts,
            batch=batch,
            sample_reqs=sample_reqs,
            cached_logits=[logits for _, logits in hits],
            future_inputs=future_inputs,
        )

    def _one_token_plan(self, reqs: list[Req], scheduled: list[tuple[Req, int]]) -> StepPlan:
        """`_plan` for a step adding one token to each request (decode steps): the same
        plan, without the per-request lists of the general case."""
        seq_lens = [len(r.slots) for r in reqs]
        token_ids: list[int] = []
        future_inputs: list[tuple[int, Req]] = []
        for row, (req, seq_len) in enumerate(zip(reqs, seq_lens)):
            if seq_len > len(req.token_ids):  # its input is the future token
                token_ids.append(FUTURE_TOKEN)
                future_inputs.append((row, req))
            else:
                token_ids.append(req.token_ids[seq_len - 1])
        sample_mask = [r.num_pending == 0 for r in reqs]
        batch = build_one_token_batch_from_table(
            token_ids=token_ids,
            seq_lens=seq_lens,
            out_slots=[r.slots[-1] for r in reqs],
            rows=[r.row for r in reqs],
            sample_mask=sample_mask,
            table=self.table,
            cascade=self._cascade_plan(scheduled),
        )
        return StepPlan(
            reqs=reqs,
            starts=[n - 1 for n in seq_lens],
            batch=batch,
            sample_reqs=[r for r, sample in zip(reqs, sample_mask) if sample],
            future_inputs=future_inputs,
        )

    def _cascade_plan(self, scheduled: list[tuple[Req, int]]) -> list[int] | None:
        """The cascade plan of a step's one-token requests (all of a decode step, the
        `single_rows` of a mixed one), when cascade attention is on and some share."""
        if not self.cascade_min_prefix:
            return None
        singles = [r.slots for r, n in scheduled if n == 1]
        if len(singles) < 2:
            return None
        plan = plan_cascade(singles, self.cascade_min_prefix, self.cascade_max_rows)
        self.stats.num_cascade_steps += plan is not None
        self.stats.num_cascade_mixed_steps += plan is not None and len(singles) < len(scheduled)
        return plan

    def _admit(
        self,
        budget: int,
        scheduled: list[tuple[Req, int]],
        hits: list[tuple[Req, torch.Tensor]],
        prefilling: list[list[int]],
    ) -> None:
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_running_requests:
                return
            if req.num_future:
                continue  # preempted with a token still on the device: admit once it is read
            first = req.waits_for
            if first is not None and not (first.num_output > 0 or first.finished):
                continue  # n > 1: share the first sequence's prompt KV once it is cached
            match = self.radix.match_prefix(req.token_ids)
            if self._shares_inflight_prefix(req, len(match.slots), prefilling):
                continue  # wait until that prompt is cached, then reuse it
            logits = None
            if len(match.slots) == req.seq_len and req.num_output == 0:
                logits = self.prefill_cache.get(req.token_ids, self.device)
            usable = req.seq_len if logits is not None else min(len(match.slots), req.seq_len - 1)
            need = req.seq_len - usable
            chunk = min(need, budget)
            self.radix.lock(match.node)
            available = self.allocator.num_free + self.radix.evictable_size
            if available < chunk + len(self.running):
                self.radix.unlock(match.node)
                return
            req.slots = list(match.slots[:usable])
            req.cached_len = usable
            self._hold(req, match.node)
            req.row = self.table.assign()
            self.table.write_prefix(req.row, req.slots, self._prefix_row(match.node, req.slots))
            if logits is not None:
                self.stats.num_prefill_cache_hits += 1
                hits.append((req, logits))
            elif not self._extend(req, chunk):
                self._release(req)
                return
            else:
                scheduled.append((req, chunk))
                budget -= chunk
            if req.num_prompt_cached < 0:
                req.num_prompt_cached = min(usable, len(req.prompt_ids))
            self.waiting.remove(req)
            self.running.append(req)
            prefilling.append(req.token_ids)

    def _shares_inflight_prefix(
        self, req: Req, matched: int, prefilling: list[list[int]]
    ) -> bool:
        """Whether a prompt being prefilled shares IN_BATCH_PREFIX_MIN more tokens with `req`
        than the radix cache holds: computing them twice would waste the step."""
        if not self.radix.enabled:
            return False
        end = matched + IN_BATCH_PREFIX_MIN
        if end >= len(req.prompt_ids):
            return False
        head = req.token_ids[:end]
        last = head[-1]  # a cheap test first: most prompts differ at that token already
        return any(len(ids) > end and ids[end - 1] == last and ids[:end] == head
                   for ids in prefilling)

    # ------------------------------------------------------------- KV slots
    def _alloc(self, n: int) -> list[int] | None:
        slots = self.allocator.alloc(n)
        if slots is None:
            self.radix.evict(n - self.allocator.num_free)
            slots = self.allocator.alloc(n)
        return slots

    def _extend(self, req: Req, n: int) -> bool:
        slots = self._alloc(n)
        if slots is None:
            return False
        self.table.write(req.row, len(req.slots), slots)
        req.slots.extend(slots)
        return True

    def _grow(self, req: Req, n: int, done: set[int]) -> bool:
        """Give a running request n more slots, preempting newer unscheduled ones if needed."""
        while not self._extend(req, n):
            victims = [r for r in self.running if id(r) not in done and r is not req]
            if not victims:
                self._preempt(req)
                return False
            self._preempt(max(victims, key=lambda r: r.arrival))
        return True

    def _preempt(self, req: Req) -> None:
        logger.debug("preempting %s at %d tokens", req.rid, req.seq_len)
        self.stats.num_preemptions += 1
        self.running.remove(req)
        self._release(req)
        position = 0
        while position < len(self.waiting) and self.waiting[position].arrival < req.arrival:
            position += 1
        self.waiting.insert(position, req)

    # ------------------------------------------------------ after the forward
    def cache_prompts(self, plan: StepPlan, logits: torch.Tensor | None) -> None:
        """Right after the forward: hand newly prefilled prompts to the radix cache and their
        logits to the prefill cache."""
        rows = {id(r): i for i, r in enumerate(plan.sample_reqs)}
        prefilled: list[tuple[Sequence[int], torch.Tensor]] = []
        for req, start in zip(plan.reqs, plan.starts):
            prompt_len = len(req.prompt_ids)
            if start < prompt_len <= req.num_computed:
                if req.num_computed == prompt_len and logits is not None and id(req) in rows:
                    prefilled.append((req.prompt_ids, logits[rows[id(req)]]))
                if not req.finished and req in self.running:
                    self._cache_prefix(req, prompt_len)
        self.prefill_cache.put_many(prefilled)

    def release_finished(self, reqs: list[Req]) -> None:
        """Release the finished ones among `reqs` (once their tokens have been read); one
        preempted while its last token was in flight leaves the waiting queue."""
        for req in reqs:
            if not req.finished:
                continue
            if req in self.running:
                self.running.remove(req)
                self._release(req)
            elif req in self.waiting:
                self.waiting.remove(req)

    def _cache_prefix(self, req: Req, length: int) -> None:
        """Hand the first `length` computed tokens to the radix cache and lock them there."""
        result = self.radix.insert(req.token_ids[:length], req.slots[:length])
        self.allocator.free(req.slots[req.cached_len : result.num_present])
        match = self.radix.match_prefix(req.token_ids[: result.num_cached])
        self.radix.lock(match.node)
        self.radix.unlock(req.node)
        cached = match.slots[req.cached_len :]
        if cached != req.slots[req.cached_len : result.num_cached]:  # the tree held a copy
            self.table.write(req.row, req.cached_len, cached)  # (else the row has them)
        req.slots[: result.num_cached] = match.slots
        req.cached_len = result.num_cached
        self._hold(req, match.node)

    def _release(self, req: Req) -> None:
        """Give all of a request's KV back: reusable prefixes to the cache, the rest freed."""
        computed = req.num_computed  # a future token's slot (no known token) stays ours: freed
        result = self.radix.insert(req.token_ids[:computed], req.slots)
        own_duplicates = req.slots[req.cached_len : result.num_present]
        beyond = req.slots[max(result.num_cached, req.cached_len) :]
        self.allocator.free(own_duplicates + beyond)
        self._unhold(req)

    def _unhold(self, req: Req) -> None:
        """The end of a request's hold on the pool once its own slots are handled: its tree
        lock and slot-table row go back, and it holds no slots."""
        if req.node is not None:
            self.radix.unlock(req.node)
        self._hold(req, None)
        self.table.free(req.row)
        req.row = 0
        req.slots = []
        req.cached_len = 0

    def _hold(self, req: Req, node: RadixNode | None) -> None:
        """Set the tree node whose path `req`'s first slots are (its locked node), and note
        `req` as that node's holder (`_prefix_row`)."""
        old = req.node
        if old is not None and self._holders.get(old.node_id) is req:
            del self._holders[old.node_id]
        req.node = node
        if node is not None and node.parent is not None:
            self._holders.setdefault(node.node_id, req)  # the first stays: its row is settled

    def _prefix_row(self, node: RadixNode, slots: list[int]) -> int:
        """The slot-table row of a running request whose first slots are `slots` (the path
        of `node`, which it holds or extends), found among the holders of `node` and of the
        nodes below it; 0 when none is at hand."""
        if not slots:
            return 0
        stack, visited = [node], 0
        while stack and visited < PREFIX_ROW_SEARCH:
            current = stack.pop()
            visited += 1
            holder = self._holders.get(current.node_id)
            if (holder is not None and self.table.settled(holder.row, len(slots))
                    and holder.slots[: len(slots)] == slots):
                return holder.row
            stack.extend(current.children.values())
        return 0

    # ------------------------------------------------------------------ stats
    @property
    def num_request_slots(self) -> int:
        """Slots referenced by running requests (cache-only tokens excluded)."""
        return self.allocator.num_used - self.radix.evictable_size
