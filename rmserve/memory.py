"""The token budget of one packed batch on a GPU: as large as the memory left after the weights
allows, capped by the engine's `max_batch_tokens`.

Activation memory grows linearly with the batch's tokens (varlen attention keeps no T x T
matrix), so one eager forward on a probe batch measures the bytes a token needs. With CUDA
graphs, the graphs' shared pool holds one largest-bucket forward and eager fallbacks need a
second, so two copies must fit. A single sample longer than the budget runs eagerly in what is
left (`longest_sample`); a longer one is refused as an input error (engine.length_limit).
"""
from __future__ import annotations

from typing import Callable

import torch

from .packing import PackedBatch, pack

GRANULARITY = 256   # budgets are multiples of this many tokens


def budget_from_memory(free_bytes: float, bytes_per_token: float, cap: int, copies: int = 1) -> int:
    """The largest multiple of GRANULARITY, at most `cap`, of which `copies` forwards fit in free_bytes."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    fit = int(free_bytes // (copies * bytes_per_token)) // GRANULARITY * GRANULARITY
    if fit < GRANULARITY:
        raise RuntimeError(
            f"not enough GPU memory for a batch of {GRANULARITY} tokens: {free_bytes / 2**30:.2f} GiB usable, "
            f"{bytes_per_token / 2**10:.0f} KiB a token x {copies}; raise gpu_memory_utilization or free memory")
    return min(cap, fit)


def probe_batch(num_tokens: int, seqlen: int, needs_gate: bool, device: torch.device) -> PackedBatch:
    """num_tokens tokens of id 0 in sequences of `seqlen` (the last one shorter)."""
    lengths = [seqlen] * (num_tokens // seqlen) + ([num_tokens % seqlen] if num_tokens % seqlen else [])
    return pack([[0] * n for n in lengths], [0] * len(lengths) if needs_gate else None, device=device)


def bytes_per_token(forward: Callable[[PackedBatch], dict], needs_gate: bool, device: torch.device,
                    probe_tokens: int = 2048, seqlen: int = 512) -> float:
    """Peak memory of one eager forward over `probe_tokens` tokens, per token (CUDA)."""
    batch = probe_batch(probe_tokens, seqlen, needs_gate, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward(batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / probe_tokens


def longest_sample(free_bytes: float, bytes_per_token: float, budget: int, graphs: bool) -> int:
    """The most tokens one sample may have: a sample longer than the budget runs eagerly on its
    own, beside the graphs' pool (which holds one budget-sized forward) when graphs are on."""
    return int(free_bytes // bytes_per_token) - (budget if graphs else 0)


def cuda_memory_plan(forward: Callable[[PackedBatch], dict], needs_gate: bool, device: torch.device,
                     cap: int, utilization: float, graphs: bool) -> tuple[int, int]:
    """(token budget of a batch, longest sample) on `device`, given the fraction of its memory this
    engine may use in all."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    per_token = bytes_per_token(forward, needs_gate, device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    usable = utilization * total - (total - free)   # what others and our weights hold is gone
    budget = budget_from_memory(usable, per_token, cap, copies=2 if graphs else 1)
    return budget, longest_sample(usable, per_token, budget, graphs)
