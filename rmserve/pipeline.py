"""Streaming scoring: an iterable of conversations in, (index, ScoreResult) out, with bounded
memory and the host's work overlapped with the device's.

    tokenizer threads  ->  length-aware scheduler  ->  pinned host batch -> async copy to device
    (chunks ahead)         (scheduler.py window)       forward (CUDA graph or eager)
                                                       head outputs only -> async copy to pinned host, event

One batch is in flight while the host packs the next and turns the previous one's outputs into
results, so in steady state the device does not wait on the host. With share_prefix on, each
window is planned with shared prompts (rmserve/prefix.py): samples of the window that start with
the same share_min_tokens+ tokens run their common prompt once.
"""
from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from .inputs import Encoded, InputError
from .packing import PackedBatch, pack
from .prefix import Group, pack_shared, plan_call
from .results import ScoreResult
from .scheduler import stream_batches, stream_plans

if TYPE_CHECKING:
    from .engine import Engine

CHUNK = 64   # conversations a tokenizer thread encodes at a time


def encode_stream(engine: "Engine", conversations: Iterable[Any], threads: int,
                  chunk: int = CHUNK) -> Iterator[tuple[int, Encoded | InputError]]:
    """(index, Encoded or InputError) in input order, tokenized up to 2 * threads chunks ahead."""
    if threads < 1:
        raise ValueError(f"tokenizer_threads must be at least 1, got {threads}")
    local = threading.local()

    def encode(items: list) -> list:
        if threads > 1 and not hasattr(local, "pre"):   # fast tokenizers are not safe to share
            local.pre = copy.deepcopy(engine.preprocessor)
        pre = local.pre if threads > 1 else engine.preprocessor
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
    moved = {f.name: getattr(batch, f.name).pin_memory().to(device, non_blocking=True)
             for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    return replace(batch, **moved)


def shared_planner(engine: "Engine"):
    """Plans a scheduler window with shared prefixes (prefix.plan_call, prompts found by equal
    leading tokens): each batch's rows in group order, and its groups renumbered to those rows
    (None when no group in the batch shares, so the batch takes the plain path)."""
    cfg = engine.config

    def plan(window: list[tuple[int, Encoded]]) -> list[tuple[list[int], list[Group] | None]]:
        out = []
        for groups in plan_call([e for _, e in window], None, min_shared=cfg.share_min_tokens,
                                max_tokens=cfg.max_batch_tokens, max_seqs=cfg.max_batch_seqs):
            rows: list[int] = []
            local: list[Group] = []
            for g in groups:
                local.append(Group(tuple(range(len(rows), len(rows) + len(g.members))), g.prefix))
                rows.extend(g.members)
            out.append((rows, local if any(g.prefix for g in local) else None))
        return out

    return plan


class _InFlight:
    """One launched batch: its samples and its outputs on their way to the host."""

    def __init__(self, items: list[tuple[int, Encoded]], outputs: dict[str, torch.Tensor], device: torch.device):
        self.items = items
        if device.type == "cuda":
            self.outputs = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                            for k, v in outputs.items()}
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.outputs, self.done = outputs, None

    def results(self, engine: "Engine") -> Iterator[tuple[int, ScoreResult]]:
        if self.done is not None:
            self.done.synchronize()
        values = {k: v.tolist() for k, v in self.outputs.items()}
        for row, (index, enc) in enumerate(self.items):
            yield index, engine._result(values, row, len(enc))


def score_stream(engine: "Engine", conversations: Iterable[Any]) -> Iterator[tuple[int, ScoreResult]]:
    """See Engine.score_stream."""
    cfg = engine.config
    errors: deque[tuple[int, ScoreResult]] = deque()

    def scorable() -> Iterator[tuple[int, Encoded]]:
        for index, enc in encode_stream(engine, conversations, cfg.tokenizer_threads):
            if isinstance(enc, Encoded):
                yield index, enc
            else:
                errors.append((index, ScoreResult(error=str(enc))))

    inflight: deque[_InFlight] = deque()
    if cfg.share_prefix:
        batches = stream_plans(scorable(), shared_planner(engine), cfg.lookahead)
    else:
        batches = ((items, None) for items in stream_batches(
            scorable(), lambda s: len(s[1]), cfg.max_batch_tokens, cfg.max_batch_seqs, cfg.lookahead))
    for items, groups in batches:
        seqs = [e.ids for _, e in items]
        gates = [e.gate for _, e in items] if engine.model.head.needs_gate else None
        host = pack(seqs, gates) if groups is None else pack_shared(seqs, gates, groups)
        # a shared-prefix batch has no graph bucket: Engine.forward runs it eagerly
        inflight.append(_InFlight(items, engine.forward(to_device(host, engine.device)), engine.device))
        while errors:
            yield errors.popleft()
        if len(inflight) > 1:   # the batch just launched keeps the device busy meanwhile
            yield from inflight.popleft().results(engine)
    while inflight:
        yield from inflight.popleft().results(engine)
    while errors:
        yield errors.popleft()
