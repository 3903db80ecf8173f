"""The model end of the batching loop: a packed batch on the device -> the head's outputs.

    pipeline (packed batch) -> ModelForward.forward -> CUDA graph replay (cuda_graphs.GraphRunner)
                                                    or eager: backbone -> head.packed

One object per engine, made at construction; it knows nothing of planning or results.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import devices
from .loader import LoadedModel
from .packing import PackedBatch

if TYPE_CHECKING:
    from .cuda_graphs import GraphRunner


class ModelForward:
    """forward(batch) -> dict of fp32 tensors [rows, ...] on the device, one row per entry of
    batch.last_idx (a shared-prefix batch's prompt segments have none), or for the head's
    `step_outputs` (a process reward model's) one row per entry of batch.step_idx.

    graphs: the CUDA graph runner (set by cuda_graphs.prepare_cuda), or None: always eager.
    Both paths run with the device current (rmserve/devices.py)."""

    def __init__(self, model: LoadedModel, device: torch.device):
        self.backbone = model.backbone
        self.head = model.head
        self.device = device
        self.needs_gate: bool = model.head.needs_gate
        self.step_outputs: tuple[str, ...] = model.head.step_outputs
        self.needs_steps: bool = bool(self.step_outputs)
        self.names: tuple[str, ...] = model.spec.head.names
        self.graphs: GraphRunner | None = None

    @torch.inference_mode()
    def eager(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        with devices.on_device(self.device):   # Triton launches on the current device
            hidden = self.backbone(batch)
            return self.head.packed(hidden, batch.last_idx, batch.gate_idx, batch.step_idx)

    @torch.inference_mode()
    def forward(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """A CUDA graph's replay when a bucket holds the batch, else eager."""
        if self.graphs is not None:
            return self.graphs(batch)
        return self.eager(batch)
