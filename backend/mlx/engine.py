"""MLXEngine: mlx-lm models behind the engine contract, with our own request lifecycle.

The request side is `EngineBase`'s (tokenizer, validation, streams, abort, detokenizer, stop
strings, finish reasons), so streaming and `stop` behave exactly as with the native engine.
The loop thread owns every MLX call. Requests run in mlx-lm's `BatchGenerator` (continuous
batching: each sequence has its own sampler, logits processors and KV cache, so any mix of
sampling parameters batches); a step is one `BatchGenerator.next()`: one decode token for
every running sequence plus one MLX_PREFILL_STEP_SIZE chunk of the prompts being prefilled.

The engine decides when a sequence ends (EOS, stop tokens and strings, max_tokens); it then
takes the sequence's KV cache out of the generator and keeps it in a `PromptCache`, so a next
turn that extends it prefills only the new tokens (reported as `cached_tokens`).

Invariants (loop thread):

| state                 | meaning                                                        |
|-----------------------|----------------------------------------------------------------|
| `_waiting`            | queued, not in the generator (MAX_RUNNING_REQUESTS reached)    |
| `_running[uid]`       | in the generator under `uid` (prefilling or decoding)          |
| `req.state.uid`       | its generator uid while running, else None                     |
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from backend.loader import ModelSource, eos_token_ids
from backend.mlx.model import MLXModel
from backend.mlx.prompt_cache import PromptCache
from backend.mlx.sampling import check_supported, processors_for, sampler_for, token_logprob
from config import Config
from engine.base import EngineBase, TextState
from engine.request import Req
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PREFILL_BATCH_SIZE = 8  # prompts prefilled side by side in one generator step


@dataclass
class MLXReqState(TextState):
    """Stream text plus the request's uid in the BatchGenerator while it runs."""

    uid: int | None = None


class MLXEngine(EngineBase):
    """The engine for BACKEND_IMPL=mlx (see the module docstring)."""

    def __init__(self, config: Config | None = None, *, source: ModelSource | None = None
                 ) -> None:
        super().__init__(config, source=source)
        self._waiting: deque[Req] = deque()
        self._running: dict[int, Req] = {}
        self._start_loop(self._start)

    def _start(self) -> None:
        """Load the model and build the generator on the loop thread (it owns MLX)."""
        mx.random.seed(self.config.seed)
        self.runner = MLXModel(self.config, self.source)
        self.info = self.runner.info
        self.eos_ids = frozenset(eos_token_ids(self.source, self.tokenizer)) | frozenset(
            self.info.eos_token_ids
        )
        self.max_context_len = self.info.max_context_len
        self.prompt_cache = PromptCache(
            self.config.mlx_prompt_cache_size, self.config.mlx_prompt_cache_tokens
        )
        self._generator = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        running = self.config.max_running_requests
        return BatchGenerator(
            self.runner.model,
            completion_batch_size=running,
            prefill_batch_size=min(PREFILL_BATCH_SIZE, running),
            prefill_step_size=self.config.mlx_prefill_step_size,
            max_kv_size=self.runner.max_kv_size,
            stream=self.runner.stream,
        )

    # ------------------------------------------------------------- public API
    @property
    def device_name(self) -> str:
        return self.runner.device

    @property
    def dtype_name(self) -> str:
        return self.runner.dtype.removeprefix("mlx.core.")

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        check_supported(params)

    def flush_cache(self) -> int:
        """Drop every kept sequence cache; returns the tokens they covered."""
        return int(self.call(self.prompt_cache.clear))

    def snapshot(self) -> dict[str, Any]:
        """Queue lengths, KV use in tokens (no fixed pool: total 0) and counters."""
        running = list(self._running.values())
        return {
            "num_running": len(running),
            "num_waiting": len(self._waiting),
            "kv_total_slots": 0,
            "kv_used_slots": sum(r.seq_len for r in running),
            "kv_cached_slots": self.prompt_cache.num_tokens,
            "kv_usage": 0.0,
            "num_preemptions": 0,
            "num_prefill_cache_hits": 0,
            "num_prompt_cache_hits": self.prompt_cache.num_hits,
            **vars(self.stats),
        }

    def _new_state(self, req: Req) -> MLXReqState:
        return MLXReqState(*self._text_state(req))

    # ------------------------------------------------------------- loop thread
    @property
    def _has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def _add(self, reqs: list[Req]) -> None:
        self._waiting.extend(reqs)

    def _abort(self, rid: str) -> None:
        for req in self._reqs.pop(rid, []):
            if req.finished:
                continue
            if req.state.uid is None:
                self._waiting.remove(req)
            else:
                self._release(req)
            self.stats.num_aborted += 1
            self._finish(req, "abort", "")

    def _step(self) -> None:
        self._admit()
        with self._generator.stats() as done:
            _, responses = self._generator.next()
        self.stats.num_steps += 1
        self.stats.forward_tokens += done.prompt_tokens + done.generation_tokens
        for response in responses:
            req = self._running.get(response.uid)
            if req is None or req.finished:
                continue
            logprobs = None
            if req.params.logprobs:
                top = req.params.top_logprobs
                logprobs = [token_logprob(response.logprobs, response.token, top)]
            self._deliver(req, response.token, logprobs)
            if req.finished:
                self._release(req)
            elif response.finish_reason is not None:  # cannot happen: its limit is ours + 1
                raise RuntimeError(f"mlx-lm ended {req.rid} early ({response.finish_reason})")

    def _admit(self) -> None:
        """Move waiting requests into the generator, each with the longest cached prefix."""
        while self._waiting and len(self._running) < self.config.max_running_requests:
            req = self._waiting.popleft()
            cache, cached = self.prompt_cache.take(req.prompt_ids)
            req.num_prompt_cached = cached
            params = req.params
            [uid] = self._generator.insert(
                [req.prompt_ids[cached:]],
                max_tokens=[params.max_new_tokens + 1],  # the engine ends it; this is a bound
                caches=[cache or self.runner.make_cache()],
                all_tokens=[req.prompt_ids[:cached]],
                samplers=[sampler_for(params, self.info.vocab_size)],
                logits_processors=[processors_for(params, self.max_context_len)],
            )
            req.state.uid = uid
            self._running[uid] = req

    def _release(self, req: Req) -> None:
        """Take a running request out of the generator; keep its cache for reuse."""
        uid = req.state.uid
        req.state.uid = None
        self._running.pop(uid, None)
        caches = self._generator.remove([uid], return_prompt_caches=True)
        if uid in caches:
            cache, tokens = caches[uid]
            self.prompt_cache.put(list(tokens), cache)

    def _fail_all(self, message: str, status: int = 500) -> None:
        """A step raised (or the engine stops): end every request and start over with a
        fresh generator."""
        failed = list(self._running.values()) + list(self._waiting)
        self._running.clear()
        self._waiting.clear()
        self._generator = self._new_generator()
        for req in failed:
            req.state.uid = None
            if not req.finished:
                self._finish(req, "abort", "", error=message, error_status=status)
