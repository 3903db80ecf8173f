"""URM (LxzGordon/URM-LLaMa-3.1-8B): a (mean, spread) pair per attribute and learned weights.

s = score.weight · h, μ_a = s[2a], spread_a = s[2a + 1]; w = fc4(SELU(fc2(SELU(fc0(h))))) (no
softmax); score = Σ_a μ_a w_a.

The spec leaves open whether the spread is a log-variance or a log-std. SPREAD_IS is the one
place that interpretation is chosen; `spreads` are always returned raw beside `sigmas`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part

SPREAD_INTERPRETATIONS = ("log_variance", "log_std")
SPREAD_IS = "log_variance"


def spread_to_sigma(spread: torch.Tensor, interpretation: str = SPREAD_IS) -> torch.Tensor:
    if interpretation == "log_variance":
        return torch.exp(0.5 * spread)
    if interpretation == "log_std":
        return torch.exp(spread)
    raise ValueError(f"spread interpretation must be one of {SPREAD_INTERPRETATIONS}, got {interpretation!r}")


class URMWeights(nn.Module):
    def __init__(self, hidden: int, n_attr: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SELU(), nn.Linear(hidden, hidden), nn.SELU(), nn.Linear(hidden, n_attr)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class URMHead(PackedHead):
    needs_gate = False
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec, spread_is: str = SPREAD_IS):
        super().__init__()
        self.score = nn.Linear(spec.hidden_size, spec.head.num_labels, bias=False)
        self.weights = URMWeights(spec.hidden_size, spec.head.num_labels // 2)
        self.spread_is = spread_is

    def first_stage(self) -> list[Part]:
        return [Part("score", self.score, "last"), Part("weights", self.weights.fc[0], "last")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = parts["score"].float()
        means, spreads = s[:, 0::2], s[:, 1::2]
        w = self.weights.fc[1:](parts["weights"]).float()     # SELU, fc2, SELU, fc4 in the MLP's dtype
        return {
            "score": (means * w).sum(dim=-1),
            "means": means,
            "spreads": spreads,
            "sigmas": spread_to_sigma(spreads, self.spread_is),
            "weights": w,
        }
