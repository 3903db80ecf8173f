"""CUDA graphs of the whole packed forward (backbone + head), one per bucket of a ladder.

A graph replays fixed kernels on fixed addresses, so each bucket has static shapes:

    tokens       [T]      token ids; rows past the batch's tokens are padding (id 0, position 0)
    positions    [T]
    cu_seqlens   [S + 1]  the batch's S' <= S query segments, then S - S' empty segments
    last_idx     [S]      pooling rows, one per scored sample; padding entries point at row 0
    gate_idx     [S]      (ArmoRM/QRM) likewise
    max_seqlen   L        a python int fixed at capture: the attention launch covers segments <= L

With share_prefix on (the default) every bucket also carries the key side of rmserve/prefix.py's
shared-prompt layout, one layout for plain and shared batches alike:

    kv_idx       [K]      K = 4T (KEY_FACTOR): per segment, the rows of its keys ([its prompt ;
                          its own tokens]); a plain batch gets the identity 0..t-1; entries past
                          the batch's keys are 0
    cu_seqlens_k [S + 1]  the batch's key offsets, then empty key ranges
    max_seqlen_k Lk       min(K, max_length), fixed at capture: no segment has more keys

A process reward model's buckets also carry static step slots, the rows its head reads:

    step_idx     [P]      P = T // STEP_SPACING: the batch's step-token rows (sample after sample,
                          as packed), then padding slots that name row 0

A batch with more step tokens than its rung's slots (steps under STEP_SPACING computed tokens
apart on average) takes a larger rung or, past the ladder, runs eagerly, as a batch over the key
side does. The head reads P rows whatever the batch holds: for Qwen2.5-Math-PRM-7B a slot costs the
score MLP's first layer (3584 x 3584, 25.7 MFLOP), so T/4 slots are 6.4 MFLOP a token row against the
backbone's ~13 GFLOP: 0.05% (a few times that through the gather-projection kernel's small tiles).

Padding cannot change a real result. Real segment i reads queries cu_seqlens[i]..[i+1] and keys
kv_idx[cu_seqlens_k[i]..[i+1]] (rows cu_seqlens[i]..[i+1] without a key side): the batch's own
ranges, copied unchanged, indexing only the batch's own rows. Padding segments are empty (no
queries, no keys); padding token rows and padding kv_idx entries lie past every real range, so
no real query reads them; every other op (embedding, norms, RoPE, projections, MLP) is row-wise;
the head reads the last_idx/gate_idx (step_idx) rows, row by row, and the padding slots' outputs
are dropped (the runner returns the batch's rows and steps only; results.py splits the steps by the
step counts the host packed). Both
FlashAttention backends take max_seqlen and max_seqlen_k as bounds only: the grid covers
cdiv(L, 128) query blocks per segment, each block reads its segment's real lengths from
cu_seqlens / cu_seqlens_k (blocks past them exit), the causal mask is aligned bottom-right from
those real lengths, and the one path whose work max_seqlen_k shapes (split-KV) runs only when
max_seqlen is 1, single-query decoding (`mha_varlen_fwd` in flash-attn and in aten), which no
bucket's L is (L >= min(128, T, max_length), T >= 256 or the whole budget). What padding
does change is the GEMMs' row count: cuBLAS may pick another kernel, so rounding may differ.

The ladder. Token rungs from 256, four per doubling (256, 320, 384, 448, 512, 640, ...), each at
most 1.25x the one below: a replayed batch of t >= 256 tokens computes fewer than 1.25t rows
when its segments fit the rung (below 256 tokens the GEMMs are bound by reading the weights,
so padding rows there cost little). Per rung T, the query bound L doubles from 128 to
min(T, max_length) with S = 16T/L segment slots, so the attention launch is about 16T/128 blocks
per head whatever the batch holds (a few empty blocks per real one), and a batch of t tokens
fits the first rung >= t when its longest segment is at most 8x its mean segment and the mean
is at least 8 tokens. The key side costs one gather of K rows per layer for K and V: for the 8B
(8 KV heads x 128, bf16) 4 KiB a key row, 16 KiB written per token per layer, against 0.44 GFLOP
per token per layer: ~0.8% at 4.8 TB/s and 800 TFLOP/s. Plain batches pay it too (one layout
keeps one ladder; two would double the captures). A batch with more than 4x its tokens in keys
(sharing saved it more than 3x) takes a larger rung or runs eagerly. Padding measured with the
engine's planner on the real workloads: bench/padding.py, bench/RESULTS.md.

Where the ladder stops. A graph saves the host's kernel launches; its padding costs GPU time.
An eager forward launches about 11 kernels a layer (norm, QKV, RoPE, K and V gathers, attention,
O, norm, gate/up, SiLU*up, down) plus 8 (embedding, final norm, head), ~5 us each, while a token
costs 2x the matmul parameters in FLOPs at ~800 TFLOP/s (bf16, H100/H200 class). Above the batch
size where those launches come to less than 2% of the batch's compute, graphs gain less than
the rungs' padding costs, so such batches run eagerly (`graph_token_limit`). Llama-3.1-8B: 360
launches, 1.8 ms, the compute of 103 tokens (13.96 GFLOP each), so its ladder stops at the rung
6,144 (launches are under 1.7% of any larger batch, and hidden behind the GPU's work when each
kernel runs longer than its launch): 88 captures at the default budget. Models of under ~1B
matmul parameters, the tiny test models among them, replay up to the budget (134 captures at
16,384 tokens). All graphs share one memory pool that holds one top-rung forward; memory.py
reserves it beside the eager budget.

The capture mechanism is injected (`CudaGraphCapture` on CUDA), so the runner's logic (bucket
choice, buffer filling, replay bookkeeping) runs on CPU too with a stand-in that re-executes
the recorded function into the same output tensors (tests/test_cuda_graphs.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from . import devices, memory
from .packing import PackedBatch
from .prefix import KEY_BUDGET_FACTOR

CAPTURABLE_ATTENTION = ("flash_attn", "torch_varlen")
Outputs = dict[str, torch.Tensor]

KEY_FACTOR = KEY_BUDGET_FACTOR   # key rows per token row of a bucket: the planner's own bound
STEP_SPACING = 4                 # token rows per static step slot (process reward models): P = T // 4
MIN_TOKENS = 256                 # lowest token rung
MIN_SEQLEN = 128                 # shortest query bound L (one FlashAttention query block)
SEQ_FACTOR = 16                  # S = SEQ_FACTOR * T / L segment slots
RUNGS_PER_OCTAVE = 4             # token rungs per doubling: each <= 1.25x the one below

# The launch cost model that sets where the ladder stops (counted for the 8B in the docstring).
LAUNCH_SECONDS = 5e-6            # host time of one eager kernel launch (a PyTorch op or a Triton launch)
MATMUL_FLOPS = 8e14              # dense bf16 rate of a large forward on an H100/H200-class GPU
LAUNCH_SHARE = 0.02              # batches whose launches would cost more than this share of their compute replay
LAUNCHES_PER_LAYER = 11          # norm, QKV, RoPE, K and V gathers, attention, O, norm, gate/up, SiLU*up, down
LAUNCHES_OUTSIDE_LAYERS = 8      # embedding, final norm, the head's gathers, projections and combine


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int             # T: static token rows
    max_seqlen: int         # L: longest query segment the attention launch covers
    seqs: int               # S: static segment slots (and pooling rows)
    keys: int = 0           # K: static key rows (kv_idx); 0: no key side (plain batches only)
    max_seqlen_k: int = 0   # Lk: longest key range the attention launch covers
    steps: int = 0          # P: static step slots (step_idx); 0: the head reads no steps


def flops_per_token(spec) -> float:
    """Matmul FLOPs of one token through the backbone (2 x the matmul parameters)."""
    h = spec.hidden_size
    per_layer = h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + 3 * h * spec.intermediate_size
    return 2.0 * spec.num_layers * per_layer


def launch_tokens(spec) -> float:
    """Tokens whose compute takes as long as one eager forward's kernel launches."""
    launches = LAUNCHES_PER_LAYER * spec.num_layers + LAUNCHES_OUTSIDE_LAYERS
    return launches * LAUNCH_SECONDS * MATMUL_FLOPS / flops_per_token(spec)


def token_rungs(lo: int, hi: int, per_octave: int = RUNGS_PER_OCTAVE) -> list[int]:
    """lo, then per_octave evenly spaced rungs in each doubling (lo = 256: 256, 320, 384, 448, 512,
    640, ...), each at most (1 + 1/per_octave)x the one below, up to hi (included)."""
    if lo < 1 or hi < lo:
        raise ValueError(f"token rungs need 1 <= lo <= hi, got {lo}, {hi}")
    out, n = [], lo
    while n < hi:
        step = max(1, n // per_octave)
        out.extend(v for v in range(n, 2 * n, step) if v < hi)
        n *= 2
    return sorted(set(out)) + [hi]


def graph_token_limit(spec, per_octave: int = RUNGS_PER_OCTAVE) -> int:
    """The top rung of a model's ladder: the first rung whose launches are at most LAUNCH_SHARE of
    its compute. Larger batches run eagerly; the engine caps this at its budget."""
    want = launch_tokens(spec) / LAUNCH_SHARE
    n = MIN_TOKENS
    while True:
        for t in token_rungs(n, 2 * n, per_octave):
            if t >= want:
                return t
        n *= 2


def _doubling(lo: int, hi: int) -> list[int]:
    """lo, 2lo, 4lo, ... below hi, then hi."""
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return out + [hi]


def bucket_ladder(max_tokens: int, max_length: int, max_seqs: int | None = None, *, key_factor: int = 0,
                  step_spacing: int = 0, min_tokens: int = MIN_TOKENS, min_seqlen: int = MIN_SEQLEN,
                  seq_factor: int = SEQ_FACTOR, per_octave: int = RUNGS_PER_OCTAVE) -> list[Bucket]:
    """Token rungs `token_rungs(min_tokens, max_tokens)`; for each rung T, query bounds L doubling
    from min_seqlen to min(T, max_length), each with seq_factor * T / L segment slots (capped by T,
    and by max_seqs samples: with a key side each sample may bring its group's prompt segment, so
    2 * max_seqs), with key_factor > 0 a key side of key_factor * T rows, Lk = min(K, max_length),
    and with step_spacing > 0 (process reward models) max(1, T // step_spacing) step slots."""
    if max_tokens < 1 or max_length < 1:
        raise ValueError("max_tokens and max_length must be positive")
    if max_seqs is not None and key_factor:
        max_seqs *= 2
    buckets = set()
    for t in token_rungs(min(min_tokens, max_tokens), max_tokens, per_octave):
        top = min(t, max_length)
        keys = key_factor * t
        steps = max(1, t // step_spacing) if step_spacing else 0
        for length in _doubling(min(min_seqlen, top), top):
            seqs = min(t, max(1, seq_factor * t // length))
            if max_seqs is not None:
                seqs = min(seqs, max_seqs)
            buckets.add(Bucket(t, length, seqs, keys, min(keys, max_length), steps))
    return sorted(buckets)


def choose_bucket(buckets: Sequence[Bucket], num_tokens: int, num_seqs: int, max_seqlen: int,
                  keys: int | None = None, max_seqlen_k: int | None = None, steps: int = 0) -> Bucket | None:
    """The smallest bucket (fewest tokens, then shortest L) that holds the batch, or None.

    keys, max_seqlen_k: a shared-prefix batch's key rows and longest key range; None for a plain
    batch (its keys are its own tokens, which every bucket's key side holds). steps: the batch's
    step tokens (process reward models)."""
    for b in sorted(buckets):
        if b.tokens < num_tokens or b.seqs < num_seqs or b.max_seqlen < max_seqlen or b.steps < steps:
            continue
        if keys is not None and (b.keys < keys or b.max_seqlen_k < max_seqlen_k):
            continue
        return b
    return None


def bucket_for(buckets: Sequence[Bucket], batch: PackedBatch) -> Bucket | None:
    """choose_bucket for a packed batch, plain or shared."""
    steps = 0 if batch.step_idx is None else batch.step_idx.numel()
    if batch.kv_idx is None:
        return choose_bucket(buckets, batch.num_tokens, batch.num_seqs, batch.max_seqlen, steps=steps)
    return choose_bucket(buckets, batch.num_tokens, batch.num_seqs, batch.max_seqlen, batch.kv_idx.numel(),
                         batch.max_seqlen_k, steps)


class Capture(Protocol):
    def record(self, fn: Callable[[], Outputs]) -> tuple[Any, Outputs]:
        """Run fn's work once into something replayable; returns (handle, fn's output tensors)."""

    def replay(self, handle: Any) -> None:
        """Redo the recorded work on the current contents of the input buffers, into the same outputs."""


class CudaGraphCapture:
    """torch.cuda.CUDAGraph per record, all in one memory pool, all captured on one stream of the
    engine's device, with a warm-up on that stream before each capture (lazy initialisation, Triton
    compiles and cuBLAS workspaces happen outside the graph).

    The explicit stream matters: torch.cuda.graph's default capture stream is made once per process
    on whichever device is current then (a second engine on another GPU would capture on the
    first one's), and a pool is shared best when every capture uses the same stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def record(self, fn: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        with devices.on_device(self.device):
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                fn()
            current.wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = fn()
        return graph, out

    def replay(self, handle: torch.cuda.CUDAGraph) -> None:
        handle.replay()   # on the current stream of the device it was captured on (CUDAGraph::replay)


class StaticInputs:
    """The input buffers every bucket reads a prefix of."""

    def __init__(self, max_tokens: int, max_seqs: int, needs_gate: bool, device: torch.device, max_keys: int = 0,
                 max_steps: int = 0):
        i64 = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(max_tokens, **i64)
        self.positions = torch.zeros(max_tokens, **i64)
        self.cu_seqlens = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.last_idx = torch.zeros(max_seqs, **i64)
        self.gate_idx = torch.zeros(max_seqs, **i64) if needs_gate else None
        self.kv_idx = torch.zeros(max_keys, **i64) if max_keys else None
        self.cu_seqlens_k = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device) if max_keys else None
        self.identity = torch.arange(max_tokens, **i64) if max_keys else None   # a plain batch's kv_idx
        self.step_idx = torch.zeros(max_steps, **i64) if max_steps else None

    def view(self, b: Bucket) -> PackedBatch:
        """The bucket's static batch: what its graph was captured on."""
        keyed = b.keys > 0
        return PackedBatch(tokens=self.tokens[:b.tokens], positions=self.positions[:b.tokens],
                           cu_seqlens=self.cu_seqlens[:b.seqs + 1], max_seqlen=b.max_seqlen,
                           last_idx=self.last_idx[:b.seqs],
                           gate_idx=None if self.gate_idx is None else self.gate_idx[:b.seqs],
                           step_idx=self.step_idx[:b.steps] if b.steps else None,
                           kv_idx=self.kv_idx[:b.keys] if keyed else None,
                           cu_seqlens_k=self.cu_seqlens_k[:b.seqs + 1] if keyed else None,
                           max_seqlen_k=b.max_seqlen_k if keyed else None)

    def fill(self, b: Bucket, batch: PackedBatch) -> None:
        """Copy `batch` (same device) into the bucket's prefix and pad the rest. No host sync."""
        t, s, rows = batch.num_tokens, batch.num_seqs, batch.last_idx.numel()
        self.tokens[:t].copy_(batch.tokens)
        self.tokens[t:b.tokens].zero_()
        self.positions[:t].copy_(batch.positions)
        self.positions[t:b.tokens].zero_()
        self.cu_seqlens[:s + 1].copy_(batch.cu_seqlens)
        self.cu_seqlens[s + 1:b.seqs + 1].fill_(t)
        self.last_idx[:rows].copy_(batch.last_idx)
        self.last_idx[rows:b.seqs].zero_()
        if self.gate_idx is not None:
            self.gate_idx[:rows].copy_(batch.gate_idx)
            self.gate_idx[rows:b.seqs].zero_()
        if b.steps:
            p = batch.step_idx.numel()
            self.step_idx[:p].copy_(batch.step_idx)
            self.step_idx[p:b.steps].zero_()
        if b.keys == 0:
            if batch.kv_idx is not None:
                raise ValueError("a shared-prefix batch needs a bucket with a key side")
            return
        if batch.kv_idx is None:   # plain: each segment's keys are its own rows
            k = t
            self.kv_idx[:t].copy_(self.identity[:t])
            self.cu_seqlens_k[:s + 1].copy_(batch.cu_seqlens)
        else:
            k = batch.kv_idx.numel()
            self.kv_idx[:k].copy_(batch.kv_idx)
            self.cu_seqlens_k[:s + 1].copy_(batch.cu_seqlens_k)
        self.kv_idx[k:b.keys].zero_()
        self.cu_seqlens_k[s + 1:b.seqs + 1].fill_(k)


class GraphRunner:
    """forward(batch) through the captured graph of the smallest bucket that fits, else eagerly.

    forward: the eager packed forward (PackedBatch -> dict of [rows, ...] tensors, e.g.
    ModelForward.eager). Outputs are copies sliced to the batch's rows (`step_outputs`, a process
    reward model's: to its steps), safe to keep across calls. One call at a time: every bucket
    shares the static input buffers. Captures and replays run on `device` made current
    (rmserve/devices.py)."""

    def __init__(self, forward: Callable[[PackedBatch], Outputs], buckets: Sequence[Bucket],
                 needs_gate: bool, device: torch.device, capture: Capture, step_outputs: tuple[str, ...] = ()):
        if not buckets:
            raise ValueError("GraphRunner needs at least one bucket")
        if len({b.keys > 0 for b in buckets}) > 1:
            raise ValueError("all buckets of a runner have one layout: every one with a key side, or none")
        if any((b.steps > 0) != bool(step_outputs) for b in buckets):
            raise ValueError("a head that reads steps needs step slots in every bucket, and only such a head")
        self.forward = forward
        self.buckets = sorted(buckets)
        self.needs_gate = needs_gate
        self.step_outputs = step_outputs
        self.device = device
        self.capture = capture
        self.inputs = StaticInputs(max(b.tokens for b in buckets), max(b.seqs for b in buckets), needs_gate,
                                   device, max(b.keys for b in buckets), max(b.steps for b in buckets))
        self.graphs: dict[Bucket, tuple[Any, Outputs]] = {}
        self.replays: Counter[Bucket] = Counter()
        self.eager = 0
        # Largest first: later captures reuse the pool memory the first one sized.
        with devices.on_device(device):
            for b in reversed(self.buckets):
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
                            gate_idx=torch.zeros(1, dtype=torch.int64, device=dev) if self.needs_gate else None,
                            step_idx=torch.tensor([n - 1], device=dev) if self.step_outputs else None)
        self.inputs.fill(b, dummy)

    def bucket_for(self, batch: PackedBatch) -> Bucket | None:
        return bucket_for(self.buckets, batch)

    @torch.inference_mode()
    def __call__(self, batch: PackedBatch) -> Outputs:
        b = self.bucket_for(batch)
        if b is None:
            self.eager += 1
            return self.forward(batch)
        if self.needs_gate and batch.gate_idx is None:
            raise ValueError("this head needs gating positions; the batch has none")
        if self.step_outputs and batch.step_idx is None:
            raise ValueError("this head needs step positions; the batch has none")
        with devices.on_device(self.device):
            self.inputs.fill(b, batch)
            handle, outputs = self.graphs[b]
            self.capture.replay(handle)
            self.replays[b] += 1
            rows = batch.last_idx.numel()
            steps = 0 if batch.step_idx is None else batch.step_idx.numel()
            return {k: v[:steps if k in self.step_outputs else rows].clone() for k, v in outputs.items()}


def prepare_cuda(forward, spec, config, attention: str,
                 capture: Capture | None = None) -> tuple[int, int, GraphRunner | None]:
    """For an engine on CUDA, on its device: the token budget chosen from free memory (memory.py),
    capped by config.max_batch_tokens, the longest sample memory allows, then the graph runner over
    the ladder up to min(graph_token_limit(spec), budget) (None with enforce_eager).

    forward: the engine's ModelForward; config: its EngineConfig (max_length already resolved);
    capture: CudaGraphCapture on the device unless given (tests pass a stand-in)."""
    use_graphs = not config.enforce_eager
    if use_graphs and attention not in CAPTURABLE_ATTENTION:
        raise ValueError(f"attention '{attention}' cannot run inside a CUDA graph (it reads cu_seqlens on "
                         f"the host); use one of {CAPTURABLE_ATTENTION} (fp16/bf16 only) or enforce_eager=True")
    key_factor = KEY_FACTOR if config.share_prefix else 0
    graph_tokens = graph_token_limit(spec) if use_graphs else 0
    with devices.on_device(forward.device):
        budget, longest = memory.cuda_memory_plan(
            forward.eager, forward.needs_gate, forward.device, config.max_batch_tokens,
            config.gpu_memory_utilization, graph_tokens=graph_tokens, key_factor=key_factor,
            needs_steps=forward.needs_steps)
        if not use_graphs:
            return budget, longest, None
        buckets = bucket_ladder(min(graph_tokens, budget), config.max_length, config.max_batch_seqs,
                                key_factor=key_factor, step_spacing=STEP_SPACING if forward.needs_steps else 0)
        runner = GraphRunner(forward.eager, buckets, forward.needs_gate, forward.device,
                             capture if capture is not None else CudaGraphCapture(forward.device),
                             forward.step_outputs)
        torch.cuda.empty_cache()   # the warm-ups' memory; the graphs keep theirs in their pool
    return budget, longest, runner
