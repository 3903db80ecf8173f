"""Every head in two stages: the first-stage matrices that read the backbone's hidden rows,
and `finish`, the rest of the head on their outputs.

`PackedHead.packed(hidden, last_idx, gate_idx, step_idx)` scores a packed batch:
- torch ops: gather the rows, then the head's own forward (`first stage -> finish`), exactly
  the PyTorch reference path;
- triton ops: `FusedProjection` runs all first-stage matrices in one `gather_project` launch per
  weight dtype straight from the packed hidden tensor, rounds each output to its matrix's dtype
  (the cast point of the PyTorch Linear it replaces), then the same `finish`.

The first-stage matrices of one dtype are stacked into one tensor at construction and the
head's Linear layers are rebound to views of it, so nothing is stored twice. Per family:
BT score; ArmoRM rewards + gating layer 0; QRM quantile outputs + gating layer 0 (one fp32 group);
URM mean/spread outputs (engine dtype) and the weights MLP's first layer (fp16 in a bf16 engine:
a second launch); GRM and the Qwen2 RM the value head's first layer; the Qwen2 PRM the same layer
on every step token (source "steps").

Sources: "last" and "gate" give one row per sample (last_idx, gate_idx [B]); "steps" one row per
step token of every sample, in sample order (step_idx [P]: the multi-position gather). A dtype
group's sources must have one row count, which "steps" does not share with the others, so a head
reads either per-sample rows or step rows; the kernel gathers whatever rows its index lists, one
output row each, with no count read back: P is the length of the index the host packed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.dispatch import TORCH_OPS, Ops

SOURCES = ("last", "gate", "steps")
_WHAT = {"last": "last-token positions", "gate": "gating positions", "steps": "step positions"}


@dataclass(frozen=True)
class Part:
    name: str            # key of this output in the parts dict given to `finish`
    linear: nn.Linear    # reads one hidden row per sample (per step for source "steps")
    source: str          # "last": the last token; "gate": the gating token (ArmoRM/QRM); "steps": each step token (PRM)


class FusedProjection:
    """All first-stage Linear layers of a head, stacked per weight dtype."""

    def __init__(self, parts: list[Part], ops: Ops):
        self.ops = ops
        self.groups: list[tuple[list[Part], torch.Tensor, torch.Tensor | None, list[str], list[int]]] = []
        dtypes = list(dict.fromkeys(p.linear.weight.dtype for p in parts))
        for dtype in dtypes:
            group = sorted((p for p in parts if p.linear.weight.dtype == dtype), key=lambda p: SOURCES.index(p.source))
            with torch.no_grad():
                weight = torch.cat([p.linear.weight for p in group]).contiguous()
                bias = None
                if any(p.linear.bias is not None for p in group):
                    bias = torch.cat([p.linear.bias.float() if p.linear.bias is not None else
                                      torch.zeros(p.linear.out_features, device=weight.device) for p in group])
            start = 0
            for p in group:   # the Linear layers now read their rows of the stacked matrix
                n = p.linear.out_features
                p.linear.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
                start += n
            sources = list(dict.fromkeys(p.source for p in group))
            if "steps" in sources and len(sources) > 1:
                raise ValueError("a head's step rows and per-sample rows cannot share one projection")
            rows = [sum(p.linear.out_features for p in group if p.source == s) for s in sources]
            self.groups.append((group, weight, bias, sources, rows))

    def __call__(self, hidden: torch.Tensor, last_idx: torch.Tensor, gate_idx: torch.Tensor | None,
                 step_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        index = {"last": last_idx, "gate": gate_idx, "steps": step_idx}
        parts: dict[str, torch.Tensor] = {}
        for group, weight, bias, sources, rows in self.groups:
            missing = [s for s in sources if index[s] is None]
            if missing:
                raise ValueError(f"this head needs {_WHAT[missing[0]]}; the batch has none")
            out = self.ops.gather_project(hidden, [index[s] for s in sources], weight, bias, rows)
            start = 0
            for p in group:
                n = p.linear.out_features
                parts[p.name] = out[:, start:start + n].to(p.linear.weight.dtype)
                start += n
        return parts


class PackedHead(nn.Module):
    """Base of the family heads: subclasses define `first_stage()` and `finish(parts)`.

    step_outputs: the outputs with one row per step (a process reward model's), not per sample."""
    needs_gate = False
    step_outputs: tuple[str, ...] = ()
    ops: Ops = TORCH_OPS
    projection: FusedProjection | None = None
    _fused: FusedProjection | None = None   # made on the first use of the Triton ops, then kept

    def first_stage(self) -> list[Part]:
        raise NotImplementedError

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, h: torch.Tensor | None, h_gate: torch.Tensor | None = None,
                h_steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """h, h_gate [B, hidden], h_steps [P, hidden]: the gathered rows. The PyTorch path."""
        rows = {"last": h, "gate": h_gate, "steps": h_steps}
        parts = {}
        for p in self.first_stage():
            if rows[p.source] is None:
                raise ValueError(f"this head needs the hidden states at its {_WHAT[p.source]}")
            parts[p.name] = p.linear(rows[p.source].to(p.linear.weight.dtype))
        return self.finish(parts)

    def packed(self, hidden: torch.Tensor, last_idx: torch.Tensor, gate_idx: torch.Tensor | None,
               step_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """hidden [T, hidden] packed; last_idx / gate_idx [B], step_idx [P] row numbers -> the head's
        outputs (fp32): [B, ...] per sample, [P] for the `step_outputs`."""
        if self.projection is None:
            used = {p.source for p in self.first_stage()}
            pick = {s: None if s not in used or idx is None else hidden[idx]
                    for s, idx in (("last", last_idx), ("gate", gate_idx), ("steps", step_idx))}
            return self(pick["last"], pick["gate"], pick["steps"])
        return self.finish(self.projection(hidden, last_idx, gate_idx, step_idx))

    def use_kernels(self, ops: Ops) -> None:
        """Combine steps through `ops`; with the Triton ops also the fused first-stage projection.

        The stacked matrices are made once per head and kept: a CUDA graph captured by one Engine
        reads their addresses, so a second Engine on the same model must not restack (and free) them."""
        self.ops = ops
        if ops.name == "triton" and self._fused is None:
            self._fused = FusedProjection(self.first_stage(), ops)
        self.projection = self._fused if ops.name == "triton" else None
