"""CUDA graphs of the whole packed forward (backbone + head), one per bucket of a ladder.

A graph replays fixed kernels on fixed addresses, so each bucket has static shapes:

    tokens     [T]        token ids; rows past the batch's tokens are padding (id 0, position 0)
    positions  [T]
    cu_seqlens [S + 1]    the batch's S' <= S sequences, then S - S' zero-length sequences
    last_idx   [S]        pooling rows; padding entries point at row 0
    gate_idx   [S]        (ArmoRM/QRM) likewise
    max_seqlen L          a python int fixed at capture: the attention launch covers sequences <= L

Padding cannot change a real result: a zero-length sequence has no queries and no keys, the
padding rows belong to no sequence (attention never reads them), every other op is row-wise,
and the head's padding rows are dropped. All buckets read prefixes of one set of input buffers
and allocate from one memory pool (replays run one after another on one stream, so their
intermediates can share memory). What no bucket fits, a prefix-sharing batch included, runs
eagerly. Only the CUDA varlen attention backends can be captured: the reference backend reads
`cu_seqlens` on the host.

The capture mechanism is injected (`CudaGraphCapture` on CUDA), so the runner's logic (bucket
choice, buffer filling, replay bookkeeping) runs on CPU too with a stand-in that re-executes
the recorded function into the same output tensors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from .packing import PackedBatch

CAPTURABLE_ATTENTION = ("flash_attn", "torch_varlen")
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int       # T: static token rows
    max_seqlen: int   # L: longest sequence the attention launch covers
    seqs: int         # S: static sequence slots


def _doubling(lo: int, hi: int) -> list[int]:
    """lo, 2lo, 4lo, ... below hi, then hi."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return out + [hi]


def bucket_ladder(max_tokens: int, max_length: int, max_seqs: int | None = None, *, min_tokens: int = 256,
                  min_seqlen: int = 128, seq_factor: int = 4) -> list[Bucket]:
    """Token sizes min_tokens, 2x, 4x, ... up to max_tokens; for each, max sequence lengths
    min_seqlen, 2x, ... up to min(T, max_length), each with seq_factor * T / L sequence slots.

    The attention launch is about S * L / 128 blocks per head whatever the batch holds, so a
    bucket's slots scale inversely with its L: a length-sorted batch of sequences near L has
    about T / L of them; seq_factor leaves room for spread within the batch."""
    if max_tokens < 1 or max_length < 1:
        raise ValueError("max_tokens and max_length must be positive")
    buckets = []
    for t in _doubling(min(min_tokens, max_tokens), max_tokens):
        top = min(t, max_length)
        for length in _doubling(min(min_seqlen, top), top):
            seqs = min(t, max(1, seq_factor * t // length))
            if max_seqs is not None:
                seqs = min(seqs, max_seqs)
            buckets.append(Bucket(tokens=t, max_seqlen=length, seqs=seqs))
    return sorted(set(buckets))


def choose_bucket(buckets: Sequence[Bucket], num_tokens: int, num_seqs: int, max_seqlen: int) -> Bucket | None:
    """The smallest bucket (fewest tokens, then shortest L) that holds the batch, or None."""
    for b in sorted(buckets):
        if b.tokens >= num_tokens and b.seqs >= num_seqs and b.max_seqlen >= max_seqlen:
            return b
    return None


class Capture(Protocol):
    def record(self, fn: Callable[[], Outputs]) -> tuple[Any, Outputs]:
        """Run fn's work once into something replayable; returns (handle, fn's output tensors)."""

    def replay(self, handle: Any) -> None:
        """Redo the recorded work on the current contents of the input buffers, into the same outputs."""


class CudaGraphCapture:
    """torch.cuda.CUDAGraph per record, all in one memory pool; warm-up before each capture
    (lazy initialisation and any autotuning happen outside the graph)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        # One warm-up stream for all: the caching allocator reuses freed blocks per stream only.
        self.side = torch.cuda.Stream(device)

    def record(self, fn: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        side = self.side
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out

    def replay(self, handle: torch.cuda.CUDAGraph) -> None:
        handle.replay()


class StaticInputs:
    """The input buffers every bucket reads a prefix of."""

    def __init__(self, max_tokens: int, max_seqs: int, needs_gate: bool, device: torch.device):
        i64 = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.cu_seqlens = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.last_idx = torch.zeros(max_seqs, **i64)
        self.gate_idx = torch.zeros(max_seqs, **i64) if needs_gate else None

    def view(self, b: Bucket) -> PackedBatch:
        """The bucket's static batch: what its graph was captured on."""
        return PackedBatch(tokens=self.tokens[:b.tokens], positions=self.positions[:b.tokens],
                           cu_seqlens=self.cu_seqlens[:b.seqs + 1], max_seqlen=b.max_seqlen,
                           last_idx=self.last_idx[:b.seqs],
                           gate_idx=None if self.gate_idx is None else self.gate_idx[:b.seqs])

    def fill(self, b: Bucket, batch: PackedBatch) -> None:
        """Copy `batch` (same device) into the bucket's prefix and pad the rest. No host sync."""
        t, s = batch.num_tokens, batch.num_seqs
        self.tokens[:t].copy_(batch.tokens)
        self.tokens[t:b.tokens].zero_()
        self.positions[:t].copy_(batch.positions)
        self.positions[t:b.tokens].zero_()
        self.cu_seqlens[:s + 1].copy_(batch.cu_seqlens)
        self.cu_seqlens[s + 1:b.seqs + 1].fill_(t)
        self.last_idx[:s].copy_(batch.last_idx)
        self.last_idx[s:b.seqs].zero_()
        if self.gate_idx is not None:
            self.gate_idx[:s].copy_(batch.gate_idx)
            self.gate_idx[s:b.seqs].zero_()


class GraphRunner:
    """forward(batch) through the captured graph of the smallest bucket that fits, else eagerly.

    forward: the eager packed forward (PackedBatch -> dict of [S, ...] tensors), e.g. Engine.forward_eager.
    Outputs are copies sliced to the batch's sequences, safe to keep across calls. One call at a
    time: every bucket shares the static input buffers."""

    def __init__(self, forward: Callable[[PackedBatch], Outputs], buckets: Sequence[Bucket],
                 needs_gate: bool, device: torch.device, capture: Capture):
        if not buckets:
            raise ValueError("GraphRunner needs at least one bucket")
        self.forward = forward
        self.buckets = sorted(buckets)
        self.needs_gate = needs_gate
        self.capture = capture
        self.inputs = StaticInputs(max(b.tokens for b in buckets), max(b.seqs for b in buckets), needs_gate, device)
        self.graphs: dict[Bucket, tuple[Any, Outputs]] = {}
        self.replays: Counter[Bucket] = Counter()
        self.eager = 0
        # Largest first: later captures reuse the pool memory the first one sized.
        for b in sorted(self.buckets, reverse=True):
            self._fill_dummy(b)
            view = self.inputs.view(b)
            self.graphs[b] = capture.record(lambda view=view: forward(view))

    def _fill_dummy(self, b: Bucket) -> None:
        """A valid batch for capture: one sequence of min(T, L) tokens, the rest padding."""
        n = min(b.tokens, b.max_seqlen)
        dev = self.inputs.tokens.device
        cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
        dummy = PackedBatch(tokens=torch.zeros(n, dtype=torch.int64, device=dev),
                            positions=torch.arange(n, device=dev), cu_seqlens=cu, max_seqlen=n,
                            last_idx=torch.tensor([n - 1], device=dev),
                            gate_idx=torch.zeros(1, dtype=torch.int64, device=dev) if self.needs_gate else None)
        self.inputs.fill(b, dummy)

    def bucket_for(self, batch: PackedBatch) -> Bucket | None:
        # Shared-prefix batches (keys gathered through kv_idx) have another shape contract: eager.
        if getattr(batch, "kv_idx", None) is not None:
            return None
        return choose_bucket(self.buckets, batch.num_tokens, batch.num_seqs, batch.max_seqlen)

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> Outputs:
        b = self.bucket_for(batch)
        if b is None:
            self.eager += 1
            return self.forward(batch)
        if self.needs_gate and batch.gate_idx is None:
            raise ValueError("this head needs gating positions; the batch has none")
        self.inputs.fill(b, batch)
        handle, outputs = self.graphs[b]
        self.capture.replay(handle)
        self.replays[b] += 1
        s = batch.num_seqs
        return {k: v[:s].clone() for k, v in outputs.items()}


def prepare_cuda(engine) -> tuple[int, int, GraphRunner | None]:
    """For an Engine on CUDA: the token budget chosen from free memory (memory.py), capped by
    max_batch_tokens, the longest sample memory allows, then the graph runner over a ladder up
    to that budget (None with enforce_eager)."""
    from .memory import cuda_memory_plan

    cfg = engine.config
    use_graphs = not cfg.enforce_eager
    if use_graphs and engine.attention not in CAPTURABLE_ATTENTION:
        raise ValueError(f"attention '{engine.attention}' cannot run inside a CUDA graph (it reads cu_seqlens on "
                         f"the host); use one of {CAPTURABLE_ATTENTION} (fp16/bf16 only) or enforce_eager=True")
    needs_gate = engine.model.head.needs_gate
    budget, longest = cuda_memory_plan(engine.forward_eager, needs_gate, engine.device, cfg.max_batch_tokens,
                                       cfg.gpu_memory_utilization, graphs=use_graphs)
    if not use_graphs:
        return budget, longest, None
    buckets = bucket_ladder(budget, cfg.max_length, cfg.max_batch_seqs)
    runner = GraphRunner(engine.forward_eager, buckets, needs_gate, engine.device, CudaGraphCapture(engine.device))
    torch.cuda.empty_cache()   # the warm-ups' memory; the graphs keep theirs in their pool
    return budget, longest, runner
