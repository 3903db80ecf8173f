"""Packed batches: no padding inside sequences, and the length-aware batch planner."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    """B sequences laid end to end in one flat token tensor of T tokens.

    tokens     [T] int64   token ids
    positions  [T] int64   position of each token in its own sequence (restarts at 0)
    cu_seqlens [B+1] int32 cumulative lengths; sequence i is tokens[cu[i]:cu[i+1]]
    max_seqlen int         longest sequence
    last_idx   [B] int64   flat index of each sequence's last token (pooling)
    gate_idx   [B] int64   flat index of each sequence's gating token (ArmoRM/QRM), else None
    step_idx   [P] int64   flat index of every step token (process reward models), sequence after
                           sequence, each sequence's in order; else None. P is the sum of the
                           sequences' step counts, which the host knows (no count read back)

    Shared prefixes (rmserve/prefix.py) give a sequence more keys than queries; then
    kv_idx       [Tk] int64   flat token index of each key row, per sequence [prefix ; own tokens]
    cu_seqlens_k [B+1] int32  cumulative key lengths
    max_seqlen_k int          longest key sequence
    and last_idx / gate_idx count B as the scored samples only (step_idx their steps). All None on
    the plain path.
    """
    tokens: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    last_idx: torch.Tensor
    gate_idx: torch.Tensor | None = None
    step_idx: torch.Tensor | None = None
    kv_idx: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """This batch with every tensor on `device`; non_blocking (a host batch going to CUDA):
        each tensor through pinned memory, so the copies run asynchronously."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = (value.pin_memory() if non_blocking else value).to(device, non_blocking=non_blocking)
        return replace(self, **moved)


def pack(seqs: Sequence[Sequence[int]], gates: Sequence[int | None] | None = None,
         device: torch.device | str = "cpu", steps: Sequence[Sequence[int]] | None = None) -> PackedBatch:
    """Pack token-id lists. gates[i] is the gating position inside sequence i (or None for all);
    steps[i] the step-token positions inside sequence i (process reward models; None: no step side)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pack needs at least one sequence and no empty sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=cu[1:])
    total = int(cu[-1])
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    positions = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(cu[:-1], lengths)
    gate_idx = None
    if gates is not None:
        if any(g is None for g in gates):
            raise ValueError("every sequence needs a gating position when gates are given")
        gate_idx = cu[:-1] + torch.tensor(list(gates), dtype=torch.int64)
    step_idx = None
    if steps is not None:
        step_idx = torch.tensor([int(cu[i]) + p for i, ps in enumerate(steps) for p in ps], dtype=torch.int64)
    return PackedBatch(tokens=tokens, positions=positions, cu_seqlens=cu.to(torch.int32), max_seqlen=int(lengths.max()),
                       last_idx=cu[1:] - 1, gate_idx=gate_idx, step_idx=step_idx).to(device)


def plan_batches(lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None) -> list[list[int]]:
    """Group sample indices into batches of at most `max_tokens` tokens (and `max_seqs` samples).

    Longest first, so each batch holds samples of similar length; a sample longer than the
    budget gets a batch of its own. Every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        full = used + n > max_tokens or (max_seqs is not None and len(current) >= max_seqs)
        if current and full:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches
