"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1): 19 objectives, prompt-conditioned gating, transform matrix.

r = W_reg h; g = softmax(MLP(H[p]) / T) · logit_scale; score = Σ_j g_j (r @ Tm)_j.
Outputs the untransformed rewards r, the gates g and the coefficients g @ Tmᵀ (score = r · coefficients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelSpec
from .gating import gate_probs


class ArmoGating(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hd, n = spec.head.gating_hidden_dim, spec.head.gating_n_hidden
        dims = [spec.hidden_size] + [hd] * n
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(n))
        self.layers.append(nn.Linear(dims[-1], spec.head.num_objectives))
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.temperature = spec.head.gating_temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return gate_probs(self.layers[-1](x), self.temperature, self.logit_scale)


class ArmoRMHead(nn.Module):
    needs_gate = True
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        n = spec.head.num_objectives
        self.regression_layer = nn.Linear(spec.hidden_size, n, bias=False)
        self.gating = ArmoGating(spec)
        self.reward_transform_matrix = nn.Parameter(torch.empty(n, n))

    def forward(self, h: torch.Tensor, h_gate: torch.Tensor) -> dict[str, torch.Tensor]:
        dt = self.regression_layer.weight.dtype
        rewards = self.regression_layer(h.to(dt))
        gates = self.gating(h_gate.to(dt))
        tm = self.reward_transform_matrix
        score = (gates * (rewards @ tm)).sum(dim=-1)
        return {
            "score": score.float(),
            "rewards": rewards.float(),
            "gating": gates.float(),
            "coefficients": (gates @ tm.T).float(),
        }
