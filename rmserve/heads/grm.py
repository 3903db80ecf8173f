"""GRM value head (Ray2333/GRM-llama3-8B-sftreg): score = W2 · ReLU(W1 h + b1) + b2 (mlp type),
or W h + b (linear type). Dropout is training-only; the checkpoint's lm_head is never loaded."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec


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


class GRMHead(nn.Module):
    needs_gate = False
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.v_head = VHead(spec)

    def forward(self, h: torch.Tensor, h_gate: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dt = next(self.v_head.parameters()).dtype
        return {"score": self.v_head(h.to(dt))[:, 0].float()}
