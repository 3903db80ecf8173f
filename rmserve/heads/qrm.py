"""QRM (nicolinho/QRM-Llama3.1-8B): a quantile distribution per objective, gated like ArmoRM.

R = reshape(W_reg h, [objectives, quantiles]) (row index objective · Q + q), quantile levels
τ_q = (q + 1) / (Q + 1). Gating MLP: (Linear no bias → ReLU → BatchNorm1d) × n, then Linear.
score = Σ_j g_j (μ @ Tm)_j with μ = mean_q R; reward_quantiles[k] = Σ_j g_j (R[:, k] @ Tm)_j.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part


class QRMGating(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hd, n = spec.head.gating_hidden_dim, spec.head.gating_n_hidden
        dims = [spec.hidden_size] + [hd] * n
        blocks: list[nn.Module] = []
        for i in range(n):
            blocks += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.ReLU(), nn.BatchNorm1d(dims[i + 1], eps=1e-5)]
        blocks.append(nn.Linear(dims[-1], spec.head.num_objectives))
        self.layers = nn.Sequential(*blocks)
        self.logit_scale = nn.Parameter(torch.empty(1))
        self.temperature = spec.head.gating_temperature


class QRMHead(PackedHead):
    needs_gate = True
    # Spec: unconfirmed whether the published checkpoint stores the transform matrix; if it
    # does not, it is the identity. This is the one place that choice is made.
    optional = {"reward_transform_matrix": "identity when absent (spec: unconfirmed whether QRM stores it)"}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        n, q = spec.head.num_objectives, spec.head.num_quantiles
        self.num_objectives, self.num_quantiles = n, q
        self.regression_layer = nn.Linear(spec.hidden_size, n * q, bias=False)
        self.gating = QRMGating(spec)
        self.reward_transform_matrix = nn.Parameter(torch.empty(n, n))
        self.eval()  # BatchNorm uses its running statistics

    def default_tensor(self, name: str) -> torch.Tensor:
        assert name == "reward_transform_matrix"
        return torch.eye(self.num_objectives)

    def quantile_levels(self) -> torch.Tensor:
        return (torch.arange(self.num_quantiles, dtype=torch.float32) + 1) / (self.num_quantiles + 1)

    def first_stage(self) -> list[Part]:
        return [Part("quantiles", self.regression_layer, "last"), Part("gating", self.gating.layers[0], "gate")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        quantiles = parts["quantiles"].reshape(-1, self.num_objectives, self.num_quantiles)
        u = self.gating.layers[1:](parts["gating"])          # ReLU, BatchNorm, ..., the last Linear
        gates, rewards, score, mixture = self.ops.qrm_combine(u, quantiles, self.reward_transform_matrix,
                                                              self.gating.temperature, self.gating.logit_scale)
        return {
            "score": score.float(),
            "rewards": rewards.float(),
            "gating": gates.float(),
            "reward_quantiles": mixture.float(),
            "quantiles": quantiles.float(),
        }
