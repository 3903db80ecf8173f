"""Reward heads, one module per family, each fed the hidden states gathered at the last token
(and, for ArmoRM/QRM, at the gating token; for a process reward model, at every step token). Every
head returns a dict of fp32 tensors whose keys are ScoreResult fields: one row per sample, or, for
the outputs a head lists in `step_outputs`, one row per step.

PRECISION is the one place where each family's cast points are chosen (see the spec's
"Precision policy"): the dtype each head submodule's weights and arithmetic use when the
engine runs in bf16/fp16. `None` means the engine dtype. An fp32 engine runs every head in fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .armorm import ArmoRMHead
from .bt import BTHead
from .qrm import QRMHead
from .urm import URMHead
from .value import ValueHead

HEADS: dict[str, type[nn.Module]] = {
    "bt": BTHead, "armorm": ArmoRMHead, "qrm": QRMHead, "urm": URMHead, "grm": ValueHead, "qwen2_rm": ValueHead,
    "qwen2_prm": ValueHead,
}

PRECISION: dict[str, dict[str, torch.dtype | None]] = {
    "bt": {"": None},                     # score.weight in the engine dtype
    "armorm": {"": None},                 # the published usage loads the whole model in bf16
    "qrm": {"": torch.float32},           # the reference upcasts the hidden state; head in fp32
    "urm": {"score": None,                # attribute means/spreads in the engine dtype
            "weights": torch.float16},    # the reference runs the weights MLP in fp16
    "grm": {"": None},                    # value head in the engine dtype
    "qwen2_rm": {"": None},               # the remote code's score MLP runs in the model's dtype
    "qwen2_prm": {"": None},              # likewise; the step softmax in fp32 (heads/value.py)
}


def head_param_dtype(family: str, name: str, engine_dtype: torch.dtype) -> torch.dtype:
    """dtype for head parameter `name` (HF name, e.g. 'weights.fc.0.weight')."""
    if engine_dtype == torch.float32:
        return torch.float32
    table = PRECISION[family]
    prefix = max((p for p in table if name.startswith(p)), key=len)
    return table[prefix] or engine_dtype


def build_head(spec: ModelSpec) -> nn.Module:
    return HEADS[spec.family](spec)
