"""Shared by ArmoRM and QRM: the gating layer's output and the transform-matrix combine."""
from __future__ import annotations

import torch


def gate_probs(u: torch.Tensor, temperature: float, logit_scale: torch.Tensor) -> torch.Tensor:
    """softmax(u / temperature) · logit_scale, so the gates sum to logit_scale, not 1."""
    return torch.softmax(u / temperature, dim=-1) * logit_scale
