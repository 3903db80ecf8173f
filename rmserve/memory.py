"""The token budget of one packed batch on a GPU: as large as the memory left after the weights
allows, capped by the engine's `max_batch_tokens`.

Activation memory grows linearly with the batch's tokens (varlen attention keeps no T x T
matrix), so one eager forward on a probe batch measures the bytes a token needs; with
share_prefix on, the probe has the shared-prompt layout's worst case (4 gathered key rows per
token, cuda_graphs.KEY_FACTOR). With CUDA graphs, the graphs' shared pool holds one forward of
the ladder's top rung (`graph_tokens`, at most the budget) beside the eager batches' budget. A
single sample longer than the budget runs eagerly in what is left (`longest_sample`); a longer
one is refused as an input error (engine.length_limit).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from . import devices
from .packing import PackedBatch, pack

GRANULARITY = 256   # budgets are multiples of this many tokens


def budget_from_memory(free_bytes: float, bytes_per_token: float, cap: int, graph_tokens: int = 0) -> int:
    """The largest multiple of GRANULARITY, at most `cap`, such that a forward of that many tokens
    fits in free_bytes beside the graphs' pool (a forward of min(budget, graph_tokens) tokens;
    graph_tokens 0: no graphs)."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    tokens = int(free_bytes // bytes_per_token)
    # b + min(b, g) <= tokens: b = tokens - g when that leaves the pool its g, else tokens / 2
    fit = max(tokens - graph_tokens, tokens // 2) if graph_tokens else tokens
    fit = fit // GRANULARITY * GRANULARITY
    if fit < GRANULARITY:
        pool = " beside the CUDA graphs' pool" if graph_tokens else ""
        raise RuntimeError(
            f"not enough GPU memory for a batch of {GRANULARITY} tokens{pool}: {free_bytes / 2**30:.2f} GiB usable, "
            f"{bytes_per_token / 2**10:.0f} KiB a token; raise gpu_memory_utilization or free memory")
    return min(cap, fit)


def probe_batch(num_tokens: int, seqlen: int, needs_gate: bool, device: torch.device,
                key_factor: int = 0, needs_steps: bool = False) -> PackedBatch:
    """num_tokens tokens of id 0 in sequences of `seqlen` (the last one shorter). key_factor > 0:
    the shared-prompt layout with key_factor keys per token (each sequence's rows repeated).
    needs_steps (process reward models): every token a step, the most rows the head can read."""
    lengths = [seqlen] * (num_tokens // seqlen) + ([num_tokens % seqlen] if num_tokens % seqlen else [])
    batch = pack([[0] * n for n in lengths], [0] * len(lengths) if needs_gate else None,
                 steps=[range(n) for n in lengths] if needs_steps else None)
    if key_factor:
        cu = batch.cu_seqlens.long()
        rows = [torch.arange(int(a), int(b)).repeat(key_factor) for a, b in zip(cu[:-1], cu[1:])]
        batch = replace(batch, kv_idx=torch.cat(rows), cu_seqlens_k=(cu * key_factor).to(torch.int32),
                        max_seqlen_k=key_factor * batch.max_seqlen)
    return batch.to(device)


def bytes_per_token(forward: Callable[[PackedBatch], dict], needs_gate: bool, device: torch.device,
                    key_factor: int = 0, probe_tokens: int = 2048, seqlen: int = 512,
                    needs_steps: bool = False) -> float:
    """Peak memory of one eager forward over `probe_tokens` tokens, per token (CUDA; run with the
    device current, devices.on_device)."""
    batch = probe_batch(probe_tokens, seqlen, needs_gate, device, key_factor, needs_steps)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward(batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / probe_tokens


def longest_sample(free_bytes: float, bytes_per_token: float, budget: int, graph_tokens: int = 0) -> int:
    """The most tokens one sample may have: a sample longer than the budget runs eagerly on its
    own, beside the graphs' pool (one forward of min(budget, graph_tokens) tokens)."""
    return int(free_bytes // bytes_per_token) - min(budget, graph_tokens)


def cuda_memory_plan(forward: Callable[[PackedBatch], dict], needs_gate: bool, device: torch.device,
                     cap: int, utilization: float, graph_tokens: int = 0, key_factor: int = 0,
                     needs_steps: bool = False) -> tuple[int, int]:
    """(token budget of a batch, longest sample) on `device`, given the fraction of its memory this
    engine may use in all, the ladder's top rung (graph_tokens; 0 without graphs), the key rows
    per token a batch may gather (key_factor; 0 without shared prompts) and whether the head reads
    step rows (a process reward model)."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    with devices.on_device(device):
        per_token = bytes_per_token(forward, needs_gate, device, key_factor, needs_steps=needs_steps)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
    usable = utilization * total - (total - free)   # what others and our weights hold is gone
    budget = budget_from_memory(usable, per_token, cap, graph_tokens)
    return budget, longest_sample(usable, per_token, budget, graph_tokens)
