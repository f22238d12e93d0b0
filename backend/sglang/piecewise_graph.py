"""Piecewise CUDA graphs for prefill and mixed steps (`PIECEWISE_CUDA_GRAPH`).

An eager step of thousands of tokens launches ~14 kernels per layer from Python; on an H100
the launches of a 6,700-token mixed step took as long as its device work (docs/BENCHMARKS.md,
seventh run), so the device waited for the host. Between two attention calls a layer's work
depends on the token count alone (`DecoderLayer.before_attention` / `after_attention`:
norms, GEMMs, q/k norms + rotary + K/V store, SiLU-and-mul), so it is recorded once per
token-count bucket and replayed; attention, whose launches follow each batch's requests,
runs eagerly between the pieces:

    piece 0:     embed, layer 0 before attention          -> q, residual
                 attention of layer 0 (eager, live rows)  -> attn_out
    piece i:     layer i-1 after attention, layer i before -> q, residual
    piece L:     layer L-1 after attention                -> hidden, residual
                 final norm and LM head of the sampled rows (eager)

Pieces read and write static buffers (`PieceBuffers`), so one set serves every bucket and
every piece. A step of T tokens runs the pieces of the smallest bucket N >= T: its inputs
are copied into the first T rows and rows T..N-1 are padding (token 0 at position 0, K/V
stored in the padding slot 0), whose outputs nobody reads. Graphs of all buckets share one
memory pool, the largest bucket first (its intermediates are the pool's largest blocks,
which the smaller buckets' then reuse), then the rest smallest first (a spent time budget or
memory leaves the middle buckets out: their steps pad up to the next captured one). A step
replays one bucket's pieces in capture order, so the pool's reuse of one piece's freed
intermediates by the next is safe. Decode batches keep their own graphs (cuda_graph.py) or
run eagerly.

`graphs=False` runs the same pieces eagerly on the same buffers (CPU tests check the
padding and the buffer flow against the plain forward there).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from backend.batch import ForwardBatch
from backend.kv_pool import KVPool
from backend.sglang.cuda_graph import choose_bucket
from backend.sglang.kernels.torch_ops import dense
from backend.sglang.layers import CausalLM, DecoderLayer, Hidden

logger = logging.getLogger(__name__)

FINE_STEP = 256  # bucket spacing up to FINE_LIMIT tokens
FINE_LIMIT = 2048
COARSE_STEP = 512  # then every COARSE_STEP tokens
CAPTURE_BUDGET_S = 120.0


def token_buckets(max_tokens: int) -> list[int]:
    """Ascending token counts: every FINE_STEP up to FINE_LIMIT, then every COARSE_STEP, and
    `max_tokens` itself (past FINE_LIMIT a step pads by at most 512 tokens, under 25%)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    buckets = list(range(FINE_STEP, min(FINE_LIMIT, max_tokens) + 1, FINE_STEP))
    buckets += range(FINE_LIMIT + COARSE_STEP, max_tokens + 1, COARSE_STEP)
    if not buckets or buckets[-1] != max_tokens:
        buckets.append(max_tokens)
    return buckets


@dataclass(frozen=True)
class PieceBuffers:
    """The static tensors the pieces read and write, sized for the largest bucket."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    out_slots: torch.Tensor  # [N] int64
    q: torch.Tensor  # [N, Hq, D]: a layer's queries, for its attention
    attn_out: torch.Tensor  # [N, Hq * D]: that attention's output
    hidden: torch.Tensor  # [N, hidden]: the last piece's output
    residual: torch.Tensor  # [N, hidden]: the residual stream between pieces

    @classmethod
    def allocate(cls, model: CausalLM, max_tokens: int, dtype: torch.dtype,
                 device: torch.device) -> PieceBuffers:
        config = model.config
        def ids() -> torch.Tensor:
            return torch.zeros(max_tokens, dtype=torch.int64, device=device)

        def activations(*shape: int) -> torch.Tensor:
            return torch.zeros(max_tokens, *shape, dtype=dtype, device=device)

        return cls(
            input_ids=ids(), positions=ids(), out_slots=ids(),
            q=activations(config.num_heads, config.head_dim),
            attn_out=activations(config.num_heads * config.head_dim),
            hidden=activations(config.hidden_size),
            residual=activations(config.hidden_size),
        )

    def load(self, batch: ForwardBatch, bucket: int) -> None:
        """The batch's T tokens into rows 0..T-1; rows T..bucket-1 become padding (stale
        output slots there would overwrite live K/V)."""
        live = batch.num_tokens
        for static, value in ((self.input_ids, batch.input_ids),
                              (self.positions, batch.positions),
                              (self.out_slots, batch.out_slots)):
            static[:live].copy_(value)
            static[live:bucket].zero_()


class PiecewiseGraphRunner:
    """Runs prefill and mixed steps of up to `max_tokens` tokens through per-layer pieces,
    replayed from CUDA graphs (`graphs=True`, after `capture()`) or run eagerly."""

    def __init__(self, model: CausalLM, kv_pool: KVPool, *, max_tokens: int,
                 dtype: torch.dtype, device: torch.device, graphs: bool = True,
                 capture_budget_s: float = CAPTURE_BUDGET_S) -> None:
        self.model = model
        self.layers: list[DecoderLayer] = list(model.model.layers)  # type: ignore[arg-type]
        self.kv_pool = kv_pool
        self.device = device
        self.use_graphs = graphs
        self.capture_budget_s = capture_budget_s
        self.buckets = token_buckets(max_tokens)
        self.buffers = PieceBuffers.allocate(model, max_tokens, dtype, device)
        self.graphs: dict[int, list[Any]] = {}
        self.ready = [] if graphs else self.buckets  # the buckets a step may use, ascending
        self.num_runs = 0
        self.capture_stream = torch.cuda.Stream(device=device) if graphs else None

    @property
    def num_pieces(self) -> int:
        return len(self.layers) + 1

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether the batch is a prefill or mixed step that a bucket (a captured one, when
        graphs are on) holds."""
        return not batch.is_decode and self._bucket(batch.num_tokens) is not None

    def _bucket(self, num_tokens: int) -> int | None:
        """The smallest usable bucket of at least `num_tokens` tokens."""
        return choose_bucket(self.ready, num_tokens) if num_tokens else None

    # ---------------------------------------------------------------- pieces
    def _piece(self, index: int, rows: int) -> None:
        """Piece `index` over the buffers' first `rows` rows (module docstring)."""
        model, buffers, layers = self.model, self.buffers, self.layers
        hidden: Hidden
        if index == 0:
            hidden = model.model.embed_tokens.forward(buffers.input_ids[:rows])
            residual = None
        else:
            hidden, residual = layers[index - 1].after_attention(
                buffers.attn_out[:rows], buffers.residual[:rows])
        if index == len(layers):
            assert residual is not None
            buffers.hidden[:rows].copy_(dense(hidden))
            buffers.residual[:rows].copy_(residual)
            return
        _, residual = layers[index].before_attention(
            hidden, residual, buffers.positions[:rows], model.cos_sin_cache,
            buffers.out_slots[:rows], self.kv_pool, q_out=buffers.q[:rows])
        buffers.residual[:rows].copy_(residual)

    def _run_piece(self, index: int, bucket: int) -> None:
        if self.use_graphs:
            self.graphs[bucket][index].replay()
        else:
            self._piece(index, bucket)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] (`CausalLM.logits`) of a batch
        `can_run` accepted; the new tokens' K/V are stored as by the plain forward."""
        bucket = self._bucket(batch.num_tokens)
        assert bucket is not None
        live = batch.num_tokens
        buffers, layers = self.buffers, self.layers
        buffers.load(batch, bucket)
        self.model.ops.prepare_attention(batch)
        for index, layer in enumerate(layers):
            self._run_piece(index, bucket)
            layer.self_attn.attend(buffers.q[:live], batch, self.kv_pool,
                                   out=buffers.attn_out[:live])
        self._run_piece(len(layers), bucket)
        self.num_runs += 1
        return self.model.head(buffers.hidden[:live], buffers.residual[:live],
                               batch.logits_indices)

    # --------------------------------------------------------------- capture
    def capture(self) -> None:
        """Record the buckets' pieces into one memory pool, the largest bucket first, then
        the rest smallest first; stop once the time budget is spent or memory runs out
        (steps then pad up to a captured bucket, or run eagerly)."""
        assert self.capture_stream is not None
        started = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        captured: dict[int, list[Any]] = {}
        order = self.buckets[-1:] + self.buckets[:-1]
        with torch.inference_mode():
            for bucket in order:
                if time.perf_counter() - started > self.capture_budget_s:
                    logger.warning("piecewise graph budget of %.0f s spent; buckets from %d "
                                   "tokens on not captured", self.capture_budget_s, bucket)
                    break
                try:
                    captured[bucket] = self._capture_bucket(bucket, pool)
                except torch.cuda.OutOfMemoryError:
                    logger.warning("out of memory capturing the %d-token piecewise graphs; "
                                   "buckets from there on not captured", bucket)
                    break
        self.graphs = captured
        self.ready = sorted(captured)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured piecewise CUDA graphs for %d token buckets (%s) x %d pieces "
                    "in %.1f s, %.0f MiB", len(captured), ", ".join(map(str, sorted(captured))),
                    self.num_pieces, time.perf_counter() - started, used / 2**20)

    def _capture_bucket(self, bucket: int, pool: Any) -> list[Any]:
        """The pieces of one bucket, all rows padding (K/V to slot 0), run once eagerly
        first so that every kernel is compiled before capture."""
        buffers = self.buffers
        for static in (buffers.input_ids, buffers.positions, buffers.out_slots):
            static[:bucket].zero_()
        for index in range(self.num_pieces):
            self._piece(index, bucket)
        torch.cuda.synchronize(self.device)
        graphs = []
        for index in range(self.num_pieces):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
                self._piece(index, bucket)
            graphs.append(graph)
        return graphs
