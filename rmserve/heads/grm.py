"""GRM value head (Ray2333/GRM-llama3-8B-sftreg): score = W2 · ReLU(W1 h + b1) + b2 (mlp type),
or W h + b (linear type). Dropout is training-only; the checkpoint's lm_head is never loaded."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part


class VHead(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hs = spec.head
        if hs.vhead_layer_type == "linear":
            self.summary = nn.Linear(spec.hidden_size, 1)
            return
        layers: list[nn.Module] = []
        n_in = spec.hidden_size
        for _ in range(hs.vhead_num_layers):
            layers += [nn.Linear(n_in, hs.vhead_num_neurons), nn.ReLU()]
            n_in = hs.vhead_num_neurons
        layers.append(nn.Linear(n_in, 1))
        self.summary = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.summary(x)


class GRMHead(PackedHead):
    needs_gate = False
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.v_head = VHead(spec)

    def first_stage(self) -> list[Part]:
        summary = self.v_head.summary
        return [Part("v_head", summary if isinstance(summary, nn.Linear) else summary[0], "last")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = parts["v_head"]
        if isinstance(self.v_head.summary, nn.Sequential):   # the layers after the first
            x = self.v_head.summary[1:](x)
        return {"score": x[:, 0].float()}
