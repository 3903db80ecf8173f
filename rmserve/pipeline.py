"""The batching loop, the one home of every scoring call: planned batches in, results out, with
the host's work overlapped with the device's.

    engine -> planner (prefix.plan_samples) -> packed batch -> ModelForward (backbone, head) -> results

    per batch:  pack on the host -> pinned memory, async copy to the device (CUDA)
                -> forward (a CUDA graph's replay or eager) -> head outputs only
                -> async copy to pinned host memory, an event -> ScoreResult per row
                   (results.ResultMaker; a process reward model's outputs come one per step
                   and are split by the step counts packed on the host)

`run` keeps one batch in flight while the host packs the next and turns the previous one's
outputs into results, so in steady state the device does not wait on the host. `score_encoded`
(Engine.score, score_encoded, the async engine, the offline job) plans one call's samples at
once; `score_stream` tokenizes on worker threads and plans a window of `lookahead` samples at a
time (scheduler.stream_plans). Both plan with the same planner, so both share prompts
(share_prefix) and merge identical samples (within the call, or within a window) the same way.
Every device step runs with the engine's device current (rmserve/devices.py).
"""
from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Hashable, Iterable, Iterator, Sequence

import torch

from . import devices
from .forward import ModelForward
from .inputs import Encoded, InputError, Preprocessor
from .packing import PackedBatch
from .prefix import Limits, PlannedBatch, plan_samples
from .results import ResultMaker, ScoreResult
from .scheduler import stream_plans

CHUNK = 64   # conversations a tokenizer thread encodes at a time


def encode_stream(preprocessor: Preprocessor, conversations: Iterable[Any], threads: int,
                  chunk: int = CHUNK) -> Iterator[tuple[int, Encoded | InputError]]:
    """(index, Encoded or InputError) in input order, tokenized up to 2 * threads chunks ahead."""
    if threads < 1:
        raise ValueError(f"tokenizer_threads must be at least 1, got {threads}")
    local = threading.local()

    def encode(items: list) -> list:
        if threads > 1 and not hasattr(local, "pre"):   # fast tokenizers are not safe to share
            local.pre = copy.deepcopy(preprocessor)
        pre = local.pre if threads > 1 else preprocessor
        return pre.encode_many(items)

    it = iter(conversations)
    with ThreadPoolExecutor(threads, thread_name_prefix="rmserve-tokenize") as pool:
        pending: deque = deque()
        start = 0

        def submit() -> None:
            nonlocal start
            items = list(islice(it, chunk))
            if items:
                pending.append((start, pool.submit(encode, items)))
                start += len(items)

        for _ in range(2 * threads):
            submit()
        while pending:
            first, future = pending.popleft()
            encoded = future.result()
            submit()
            yield from enumerate(encoded, first)


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """A host batch on `device`: through pinned memory and non-blocking copies on CUDA."""
    if device.type != "cuda":
        return batch
    return batch.to(device, non_blocking=True)


class InFlight:
    """One launched batch: its plan and its head outputs on their way to the host."""

    def __init__(self, planned: PlannedBatch, outputs: dict[str, torch.Tensor], device: torch.device):
        self.planned = planned
        self.device = device
        if device.type == "cuda":
            self.outputs = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                            for k, v in outputs.items()}
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(device))
        else:
            self.outputs, self.done = outputs, None

    def results(self, make: ResultMaker) -> list[tuple[Hashable, ScoreResult]]:
        """(owner key, result) for every owner of every row; repeats of a sample get equal copies."""
        if self.done is not None:
            with devices.on_device(self.device):
                self.done.synchronize()
        values = {k: v.tolist() for k, v in self.outputs.items()}
        samples = self.planned.samples
        out = []
        for res, owners in zip(make(values, [len(e) for e in samples], [len(e.steps) for e in samples]),
                               self.planned.owners):
            out.append((owners[0], res))
            out.extend((key, copy.deepcopy(res)) for key in owners[1:])
        return out


def launch(model: ModelForward, planned: PlannedBatch) -> InFlight:
    """The per-batch step up to the device: pack -> device -> forward -> outputs on their way back."""
    host = planned.pack(model.needs_gate, model.needs_steps)
    with devices.on_device(model.device):
        outputs = model.forward(to_device(host, model.device))
        return InFlight(planned, outputs, model.device)


def run(model: ModelForward, batches: Iterable[PlannedBatch | None],
        make: ResultMaker) -> Iterator[tuple[Hashable, ScoreResult] | None]:
    """Every planned batch through the model, one in flight while the host prepares the next:
    yields (owner key, result) as batches complete; `make` turns a batch's outputs into results.
    A None among the batches is yielded back as it comes (score_stream's turn to yield errors)."""
    inflight: deque[InFlight] = deque()
    for planned in batches:
        if planned is None:   # nothing to launch (a stream window of unscorable inputs): the caller's turn
            yield None
            continue
        inflight.append(launch(model, planned))
        if len(inflight) > 1:   # the batch just launched keeps the device busy meanwhile
            yield from inflight.popleft().results(make)
    while inflight:
        yield from inflight.popleft().results(make)


def score_encoded(model: ModelForward, encoded: Sequence[Encoded | InputError],
                  groups: Sequence[Hashable | None] | None, limits: Limits,
                  make: ResultMaker) -> list[ScoreResult]:
    """Encoded samples (or their input errors) -> results in input order (see Engine.score_encoded)."""
    if groups is not None and len(groups) != len(encoded):
        raise ValueError(f"groups= needs one key per sample: {len(groups)} keys for {len(encoded)} samples")
    results: list[ScoreResult | None] = [None] * len(encoded)
    items: list[tuple[int, Encoded]] = []
    for i, e in enumerate(encoded):
        if isinstance(e, Encoded):
            items.append((i, e))
        else:
            results[i] = ScoreResult(error=str(e))
    hints = None if groups is None else [groups[i] for i, _ in items]
    for i, res in run(model, plan_samples(items, hints, limits), make):
        results[i] = res
    return results  # type: ignore[return-value]


def window_planner(limits: Limits):
    """scheduler.stream_plans' planner: a window of (index, Encoded or InputError) -> batches, each
    (the window positions of all its samples, repeats included, and its PlannedBatch), after one
    (the positions of the window's unscorable inputs, None) when it has any."""

    def plan(window: Sequence[tuple[int, Encoded | InputError]]) -> list[tuple[list[int], PlannedBatch | None]]:
        position = {index: at for at, (index, _) in enumerate(window)}
        errors = [at for at, (_, e) in enumerate(window) if not isinstance(e, Encoded)]
        scorable = [(index, e) for index, e in window if isinstance(e, Encoded)]
        return ([(errors, None)] if errors else []) + [
            ([position[key] for owners in planned.owners for key in owners], planned)
            for planned in plan_samples(scorable, None, limits)]

    return plan


def score_stream(model: ModelForward, preprocessor: Preprocessor, conversations: Iterable[Any], limits: Limits,
                 make: ResultMaker, lookahead: int, threads: int) -> Iterator[tuple[int, ScoreResult]]:
    """See Engine.score_stream. Unscorable inputs take their place in the look-ahead window like the
    others (so a stream of them is read a window at a time too); their results come out when the
    window is planned."""
    errors: deque[tuple[int, ScoreResult]] = deque()

    def planned() -> Iterator[PlannedBatch | None]:
        windows = stream_plans(encode_stream(preprocessor, conversations, threads), window_planner(limits), lookahead)
        for samples, batch in windows:
            if batch is None:   # the window's unscorable inputs
                errors.extend((index, ScoreResult(error=str(e))) for index, e in samples)
            yield batch

    for item in run(model, planned(), make):
        while errors:
            yield errors.popleft()
        if item is not None:
            yield item
    while errors:
        yield errors.popleft()
