"""Length-aware batching of a stream with bounded look-ahead.

`stream_batches` turns an iterable of samples (any number, millions included) into packed
batches under a token budget while holding at most `lookahead` samples plus one batch: it
collects a window, plans it longest first with `packing.plan_batches` (so each batch holds
samples of similar length and little of the budget is wasted), emits every full batch, and lets
the window's last, partial batch wait for the next window once. Every sample comes out exactly
once; a sample waits at most two windows. The consumer restores input order from whatever
index it carries in its samples.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from .packing import plan_batches

T = TypeVar("T")
# A window planner: the window's samples -> batches, each (indices into the window in the
# batch's row order, anything the batch carries along, e.g. its shared-prefix groups).
Planner = Callable[[Sequence[T]], list[tuple[list[int], Any]]]


def stream_batches(samples: Iterable[T], length: Callable[[T], int], max_tokens: int,
                   max_seqs: int | None = None, lookahead: int = 2048) -> Iterator[list[T]]:
    """samples -> batches (lists of samples) of at most `max_tokens` tokens and `max_seqs` samples.

    length(sample) is its token count. A sample longer than `max_tokens` gets a batch of its own.
    lookahead: how many samples are sorted together (the memory bound); 1 batches in input order."""
    if max_tokens < 1 or (max_seqs is not None and max_seqs < 1):
        raise ValueError("max_tokens, max_seqs and lookahead must be positive")

    def plan(window: Sequence[T]) -> list[tuple[list[int], Any]]:
        return [(b, None) for b in plan_batches([length(x) for x in window], max_tokens, max_seqs)]

    for items, _ in stream_plans(samples, plan, lookahead):
        yield items


def stream_plans(samples: Iterable[T], plan: Planner, lookahead: int = 2048) -> Iterator[tuple[list[T], Any]]:
    """The windowing of `stream_batches` with any planner: yields (the batch's samples in row
    order, what the planner attached). The window's last batch waits for the next window once."""
    if lookahead < 1:
        raise ValueError("max_tokens, max_seqs and lookahead must be positive")
    window: list[tuple[T, bool]] = []     # (sample, waited once already)
    for sample in samples:
        window.append((sample, False))
        if len(window) >= lookahead:
            batches, window = _plan(window, plan, final=False)
            yield from batches
    if window:
        batches, _ = _plan(window, plan, final=True)
        yield from batches


def _plan(window: Sequence[tuple[T, bool]], plan: Planner,
          final: bool) -> tuple[list[tuple[list[T], Any]], list[tuple[T, bool]]]:
    batches = plan([x for x, _ in window])
    keep: list[tuple[T, bool]] = []
    if not final and batches:
        last, _ = batches[-1]
        if not any(window[i][1] for i in last):
            batches.pop()
            keep = [(window[i][0], True) for i in last]
    return [([window[i][0] for i in rows], extra) for rows, extra in batches], keep
