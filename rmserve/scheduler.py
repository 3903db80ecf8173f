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

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from .packing import plan_batches

T = TypeVar("T")


def stream_batches(samples: Iterable[T], length: Callable[[T], int], max_tokens: int,
                   max_seqs: int | None = None, lookahead: int = 2048) -> Iterator[list[T]]:
    """samples -> batches (lists of samples) of at most `max_tokens` tokens and `max_seqs` samples.

    length(sample) is its token count. A sample longer than `max_tokens` gets a batch of its own.
    lookahead: how many samples are sorted together (the memory bound); 1 batches in input order."""
    if max_tokens < 1 or lookahead < 1 or (max_seqs is not None and max_seqs < 1):
        raise ValueError("max_tokens, max_seqs and lookahead must be positive")
    window: list[tuple[T, int, bool]] = []     # (sample, length, waited once already)
    for sample in samples:
        window.append((sample, length(sample), False))
        if len(window) >= lookahead:
            batches, window = _plan(window, max_tokens, max_seqs, final=False)
            yield from batches
    if window:
        batches, _ = _plan(window, max_tokens, max_seqs, final=True)
        yield from batches


def _plan(window: Sequence[tuple[T, int, bool]], max_tokens: int, max_seqs: int | None,
          final: bool) -> tuple[list[list[T]], list[tuple[T, int, bool]]]:
    groups = plan_batches([n for _, n, _ in window], max_tokens, max_seqs)
    keep: list[tuple[T, int, bool]] = []
    if not final and groups:
        last = groups[-1]
        if not any(window[i][2] for i in last):
            groups.pop()
            keep = [(window[i][0], window[i][1], True) for i in last]
    return [[window[i][0] for i in g] for g in groups], keep
