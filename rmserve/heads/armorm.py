"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1): 19 objectives, prompt-conditioned gating, transform matrix.

r = W_reg h; g = softmax(MLP(H[p]) / T) · logit_scale; score = Σ_j g_j (r @ Tm)_j.
Outputs the untransformed rewards r, the gates g and the coefficients g @ Tmᵀ (score = r · coefficients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part


class ArmoGating(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hd, n = spec.head.gating_hidden_dim, spec.head.gating_n_hidden
        dims = [spec.hidden_size] + [hd] * n
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(n))
        self.layers.append(nn.Linear(dims[-1], spec.head.num_objectives))
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.temperature = spec.head.gating_temperature

    def logits_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """The gating logits u from the first layer's output (before its ReLU)."""
        for layer in self.layers[1:]:
            x = layer(F.relu(x))
        return x


class ArmoRMHead(PackedHead):
    needs_gate = True
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        n = spec.head.num_objectives
        self.regression_layer = nn.Linear(spec.hidden_size, n, bias=False)
        self.gating = ArmoGating(spec)
        self.reward_transform_matrix = nn.Parameter(torch.empty(n, n))

    def first_stage(self) -> list[Part]:
        return [Part("rewards", self.regression_layer, "last"), Part("gating", self.gating.layers[0], "gate")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rewards = parts["rewards"]
        u = self.gating.logits_from_first(parts["gating"])
        gates, coefficients, score = self.ops.armo_combine(u, rewards, self.reward_transform_matrix,
                                                           self.gating.temperature, self.gating.logit_scale)
        return {
            "score": score.float(),
            "rewards": rewards.float(),
            "gating": gates.float(),
            "coefficients": coefficients.float(),
        }
