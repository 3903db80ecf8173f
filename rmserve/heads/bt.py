"""Bradley-Terry score head (Skywork-Reward, FsfairX, GRM-distill): score = score.weight · h."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part


class BTHead(PackedHead):
    needs_gate = False
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.score = nn.Linear(spec.hidden_size, spec.head.num_labels, bias=False)

    def first_stage(self) -> list[Part]:
        return [Part("score", self.score, "last")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = parts["score"].float()
        if logits.shape[1] == 1:
            return {"score": logits[:, 0]}
        # Several labels: no single score is defined; return every logit.
        return {"logits": logits}
