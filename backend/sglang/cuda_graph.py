"""CUDA graphs for the native runner's decode steps.

A decode step launches hundreds of small kernels; replayed from a graph they cost ~1 µs each
instead of the host's ~6.5 µs plus Python. One graph per batch-size bucket (1, 2, 4, 8, then
every 16 up to CUDA_GRAPH_MAX_BS) is captured at start-up, largest first, all into one
memory pool. A live decode batch of B requests runs the graph of the smallest bucket N >= B:

- its tensors are copied into static buffers (one Triton launch, see
  kernels/triton/graph_inputs.py) and rows B..N-1 are padding: token 0 at position 0, K/V
  written to the padding slot 0 (no request owns it), attending that one slot;
- during capture the ForwardBatch's host lists describe the static capacity (every request
  at the model's longest context), so host-side choices such as the decode kernel's split
  count hold for any live batch; the kernels read the real lengths on the device;
- the LM head writes the logits of all N rows straight into one static buffer (no copy
  after it: ~0.3 MB a row); the live rows are returned as a view of it, valid until the
  next forward;
- with cascade attention (backend/cascade.py) each bucket gets a second graph, captured with
  a static cascade plan, for batches whose rows share prefixes; batches without a plan
  replay the plain graph, which has no cascade work in it.

Graphs need a kernel set whose decode path makes no host-side choice from the live lengths
and never synchronises: the Triton set (`GRAPH_SAFE_KERNEL_SETS`). Batches that are not pure
decode, larger than the largest bucket, or whose KV index list exceeds the static capacity
run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from backend.batch import ForwardBatch
from backend.kv_pool import KVPool

if TYPE_CHECKING:
    from backend.sglang.runner import NativeRunner

logger = logging.getLogger(__name__)

GRAPH_SAFE_KERNEL_SETS = frozenset({"backend.sglang.kernels.triton_ops"})
SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16
KV_INDEX_SLACK = 4  # static KV index capacity, in multiples of the pool (shared prefixes)
DEFAULT_CAPTURE_BUDGET_S = 120.0


class DecodeModel(Protocol):
    """The model a graph records: logits of every row, into `logits_out` when given."""

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch,
                 kv_pool: KVPool, logits_out: torch.Tensor | None = None) -> torch.Tensor: ...


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """Bucket sizes, ascending: 1, 2, 4, 8, then every 16, and `max_batch_size` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets = [n for n in SMALL_BUCKETS if n <= max_batch_size]
    buckets += range(BUCKET_STEP, max_batch_size + 1, BUCKET_STEP)
    if buckets[-1] != max_batch_size:
        buckets.append(max_batch_size)
    return buckets


def choose_bucket(buckets: list[int], batch_size: int) -> int | None:
    """The smallest of the ascending `buckets` that holds `batch_size` rows; None if none."""
    index = bisect.bisect_left(buckets, batch_size)
    return buckets[index] if index < len(buckets) else None


def kv_index_capacity(max_batch_size: int, max_context_len: int, num_kv_slots: int) -> int:
    """Entries of the static kv_indices buffer: every request at full context, capped at
    KV_INDEX_SLACK pools (requests sharing a prefix list its slots once each), plus one
    padding entry per row."""
    return min(max_batch_size * max_context_len, KV_INDEX_SLACK * num_kv_slots) + max_batch_size


def uses_graph_safe_kernels(ops: object) -> bool:
    """Whether the kernel set module `ops` may be captured in a decode graph."""
    return getattr(ops, "__name__", None) in GRAPH_SAFE_KERNEL_SETS


@dataclass(frozen=True)
class StaticDecodeInputs:
    """Input buffers shared by every bucket's graph, sized for the largest bucket; a bucket
    of N rows uses their first N (N + 1 for kv_indptr) entries."""

    input_ids: torch.Tensor  # [max_bs]
    positions: torch.Tensor  # [max_bs]
    out_slots: torch.Tensor  # [max_bs]
    qo_indptr: torch.Tensor  # [max_bs + 1] 0, 1, 2, ... (one token per request)
    kv_indptr: torch.Tensor  # [max_bs + 1]
    kv_indices: torch.Tensor  # [capacity]
    logits_indices: torch.Tensor  # [max_bs] 0, 1, 2, ...
    cascade: torch.Tensor  # [4, max_bs] a cascade plan (backend/cascade.py)

    @classmethod
    def allocate(cls, max_batch_size: int, kv_capacity: int,
                 device: torch.device) -> StaticDecodeInputs:
        """Buffers holding `max_batch_size` padding rows (each attending slot 0)."""
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        steps = torch.arange(max_batch_size + 1, dtype=torch.int64, device=device)
        cascade = zeros(4 * max_batch_size).view(4, max_batch_size)
        cascade[0] = -1
        return cls(
            input_ids=zeros(max_batch_size),
            positions=zeros(max_batch_size),
            out_slots=zeros(max_batch_size),
            qo_indptr=steps,
            kv_indptr=steps.clone(),
            kv_indices=zeros(max(kv_capacity, max_batch_size)),
            logits_indices=steps[:-1].clone(),
            cascade=cascade,
        )

    @property
    def max_batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    def fits(self, batch: ForwardBatch, bucket: int) -> bool:
        """Whether the batch's KV index list plus one entry per padding row fits."""
        padded = batch.kv_indices.shape[0] + bucket - batch.batch_size
        return padded <= self.kv_indices.shape[0]

    def batch_view(self, bucket: int, capture_seq_len: int, cascade: bool = False
                   ) -> ForwardBatch:
        """The ForwardBatch of a bucket's graph: static tensors, and host lists describing
        the capacity (every request `capture_seq_len` long) rather than any live batch;
        with `cascade`, the static cascade plan."""
        return ForwardBatch(
            input_ids=self.input_ids[:bucket],
            positions=self.positions[:bucket],
            out_slots=self.out_slots[:bucket],
            qo_indptr=self.qo_indptr[: bucket + 1],
            kv_indptr=self.kv_indptr[: bucket + 1],
            kv_indices=self.kv_indices,
            logits_indices=self.logits_indices[:bucket],
            seq_lens=[capture_seq_len] * bucket,
            extend_lens=[1] * bucket,
            cascade=self.cascade[:, :bucket] if cascade else None,
        )

    def load(self, batch: ForwardBatch, bucket: int, cascade: bool = False) -> None:
        """Copy a live decode batch into the first `bucket` rows, padding the rest (and its
        cascade plan, for a graph captured with one)."""
        from backend.sglang.kernels.triton.graph_inputs import pad_decode_inputs

        pad_decode_inputs(
            batch.input_ids, batch.positions, batch.out_slots, batch.kv_indptr,
            batch.kv_indices,
            (self.input_ids[:bucket], self.positions[:bucket], self.out_slots[:bucket],
             self.kv_indptr[: bucket + 1], self.kv_indices),
            batch.cascade, self.cascade[:, :bucket] if cascade else None,
        )


class CudaGraphRunner:
    """Captures the decode forward per bucket and replays it for live decode batches."""

    def __init__(
        self,
        model: DecodeModel,
        kv_pool: KVPool,
        *,
        vocab_size: int,
        max_batch_size: int,
        max_context_len: int,
        num_kv_slots: int,
        device: torch.device,
        capture_budget_s: float = DEFAULT_CAPTURE_BUDGET_S,
        cascade: bool = False,
    ) -> None:
        """Allocates the static buffers; `capture()` records the graphs (two per bucket
        with `cascade`)."""
        self.model = model
        self.kv_pool = kv_pool
        self.device = device
        self.max_context_len = max_context_len
        self.capture_budget_s = capture_budget_s
        self.buckets_wanted = batch_size_buckets(max_batch_size)
        capacity = kv_index_capacity(max_batch_size, max_context_len, num_kv_slots)
        self.inputs = StaticDecodeInputs.allocate(max_batch_size, capacity, device)
        self.max_batch_size = max_batch_size
        self.vocab_size = vocab_size
        self.logits: torch.Tensor | None = None  # in the head's dtype, from the first capture
        self.cascade = cascade
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buckets: list[int] = []  # captured, ascending
        self.num_replays = 0
        # torch.cuda.graph's shared default capture stream lives on whichever GPU made it
        # first: each engine captures on a stream of its own device.
        self.capture_stream = torch.cuda.Stream(device=device)

    def capture(self) -> None:
        """Record one graph per bucket, largest first, into one memory pool; stop early
        (smaller batches then pad up to a captured bucket) once the time budget is spent."""
        free_before = torch.cuda.mem_get_info(self.device)[0]
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(self.buckets_wanted):
                if time.perf_counter() - started > self.capture_budget_s:
                    logger.warning("CUDA graph capture budget of %.0f s spent; buckets below "
                                   "%d not captured", self.capture_budget_s, bucket + 1)
                    break
                self.graphs[bucket] = self._capture_bucket(bucket, pool, cascade=False)
                if self.cascade:
                    self.cascade_graphs[bucket] = self._capture_bucket(bucket, pool,
                                                                       cascade=True)
        self.buckets = sorted(self.graphs)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info("captured %d CUDA graphs (batch sizes %s%s) in %.1f s, %.0f MiB",
                    len(self.graphs) + len(self.cascade_graphs), _describe(self.buckets),
                    "; each also with cascade attention" if self.cascade else "",
                    time.perf_counter() - started, used / 2**20)

    def _capture_bucket(self, bucket: int, pool: Any, cascade: bool) -> torch.cuda.CUDAGraph:
        batch = self.inputs.batch_view(bucket, self.max_context_len, cascade)
        self._reset_padding(bucket)
        if self.logits is None:  # in the head's output dtype
            first = self.model(batch.input_ids, batch.positions, batch, self.kv_pool)
            self.logits = torch.zeros(self.max_batch_size, self.vocab_size, dtype=first.dtype,
                                      device=self.device)
        out = self.logits[:bucket]
        # eagerly first: every kernel the graph records is compiled and loaded before capture
        self.model(batch.input_ids, batch.positions, batch, self.kv_pool, logits_out=out)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
            self.model(batch.input_ids, batch.positions, batch, self.kv_pool, logits_out=out)
        return graph

    def _reset_padding(self, bucket: int) -> None:
        """Make every row of the bucket a padding row (the warm-up run writes slot 0 only)."""
        self.inputs.input_ids[:bucket].zero_()
        self.inputs.positions[:bucket].zero_()
        self.inputs.out_slots[:bucket].zero_()
        self.inputs.kv_indptr[: bucket + 1].copy_(self.inputs.qo_indptr[: bucket + 1])
        self.inputs.kv_indices[:bucket].zero_()
        self.inputs.cascade[:, :bucket].zero_()
        self.inputs.cascade[0, :bucket] = -1

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether a captured graph serves this batch."""
        if not self.buckets or batch.num_tokens != batch.batch_size or not batch.is_decode:
            return False
        bucket = choose_bucket(self.buckets, batch.batch_size)
        return bucket is not None and self.inputs.fits(batch, bucket)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the bucket's graph for a batch `can_run` accepted; logits
        [len(batch.logits_indices), vocab] in the head's dtype, a view valid until the next
        forward."""
        bucket = choose_bucket(self.buckets, batch.batch_size)
        assert bucket is not None
        graph = self.cascade_graphs.get(bucket) if batch.cascade is not None else None
        self.inputs.load(batch, bucket, cascade=graph is not None)
        (graph or self.graphs[bucket]).replay()
        self.num_replays += 1
        assert self.logits is not None
        if batch.logits_indices.shape[0] == batch.batch_size:
            return self.logits[: batch.batch_size]
        return self.logits.index_select(0, batch.logits_indices)


def _describe(buckets: list[int]) -> str:
    if len(buckets) <= 6:
        return ", ".join(map(str, buckets))
    return f"{buckets[0]}, {buckets[1]}, ..., {buckets[-1]}"


def capture_decode_graphs(runner: NativeRunner, max_batch_size: int) -> CudaGraphRunner | None:
    """Capture the decode graphs of a CUDA NativeRunner (with cascade attention when the
    runner uses it); None (logged) when its kernel set is not graph-safe."""
    if not uses_graph_safe_kernels(runner.ops):
        logger.warning("CUDA graphs need the triton kernel set; decode runs eagerly")
        return None
    graphs = CudaGraphRunner(
        runner.model, runner.kv_pool,
        vocab_size=runner.info.vocab_size,
        max_batch_size=max_batch_size,
        max_context_len=runner.info.max_context_len,
        num_kv_slots=runner.num_kv_slots,
        device=runner.device,
        cascade=runner.cascade_attention,
    )
    graphs.capture()
    return graphs
