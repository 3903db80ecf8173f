"""Value heads: an MLP (Linear -> ReLU, n times, then Linear) or one Linear, with biases, on the last
token's hidden state, or (a process reward model) on every step token's. One module for every family
whose head has this shape; the names, sizes and where it reads come from the spec
(config.HeadSpec.vhead_*, step_token):

| family    | checkpoint names      | shape                                           | read at      | outputs |
|-----------|-----------------------|-------------------------------------------------|--------------|---------|
| grm       | v_head.summary.{0,2}  | Linear(hidden, 1024) -> ReLU -> Linear(1024, 1) (or one Linear: v_head.summary) | last token | score |
| qwen2_rm  | score.{0,2}           | Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1) | last token | score |
| qwen2_prm | score.{0,2}           | Linear(hidden, hidden) -> ReLU -> Linear(hidden, 2) | each step token | step_rewards = softmax(logits)[:, 1] |

GRM (Ray2333/GRM-llama3-8B-sftreg): score = W2 · ReLU(W1 h + b1) + b2; dropout is training-only; the
checkpoint's lm_head is never loaded.

Qwen2ForRewardModel (Qwen/Qwen2.5-Math-RM-72B, remote code modeling_qwen2_rm.py): the same MLP of
width hidden, read at the last token. The pooling was checked in public ports of that file:
SGLang's python/sglang/srt/models/qwen2_rm.py (commit 0385ece3c4c1a649cf8f7be9c0fb2269307f783e)
pools its score with PoolingType.LAST; vLLM's vllm/model_executor/models/qwen2_rm.py (commit
002b4cf80b730f384dbc7d5f85db8a10b14af56a, "Adapted from .../Qwen2.5-Math-RM-72B/.../modeling_qwen2_rm.py")
returns every token's value (pooling ALL), of which the reward is the last token's. Both build the
score MLP with biases and num_labels = 1.

Qwen2ForProcessRewardModel (Qwen/Qwen2.5-Math-PRM-7B): the same MLP with num_labels = 2 (vLLM's port in the
same file), evaluated at every token; its model card (huggingface.co/Qwen/Qwen2.5-Math-PRM-7B, README at
0610740) keeps the rows at the step tokens and takes `F.softmax(logits, dim=-1)[..., 1]` of each. Here the
first Linear reads only the step tokens' rows (Part source "steps": one row per step, not per sample; the
fused projection gathers them like the last tokens, heads/fused.py), and the head returns one reward per
step; the host splits them per sample and aggregates them into `score` (rmserve/steps.py, results.py).
The softmax runs in fp32 on the logits rounded to the head's dtype (the cast point of the Linear); the
card's bf16 softmax rounds that probability once more to bf16 (at most 2^-9 relative), which rmserve does
not: one documented difference, more accurate, as ArmoRM's fp32 gating combine.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .fused import PackedHead, Part


def _mlp(spec: ModelSpec) -> nn.Module:
    hs = spec.head
    if hs.vhead_layer_type == "linear":
        return nn.Linear(spec.hidden_size, hs.vhead_outputs)
    layers: list[nn.Module] = []
    n_in = spec.hidden_size
    for _ in range(hs.vhead_num_layers):
        layers += [nn.Linear(n_in, hs.vhead_num_neurons), nn.ReLU()]
        n_in = hs.vhead_num_neurons
    layers.append(nn.Linear(n_in, hs.vhead_outputs))
    return nn.Sequential(*layers)


class ValueHead(PackedHead):
    needs_gate = False
    optional: dict[str, str] = {}

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.per_step = bool(spec.head.step_token)   # a process reward model: one output row per step
        self.step_outputs = ("step_rewards",) if self.per_step else ()
        *parents, name = spec.head.vhead_prefix.split(".")
        owner: nn.Module = self
        for part in parents:      # e.g. "v_head" for GRM's v_head.summary
            owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(name, _mlp(spec))
        self.prefix = spec.head.vhead_prefix

    @property
    def mlp(self) -> nn.Module:
        return self.get_submodule(self.prefix)

    def first_stage(self) -> list[Part]:
        mlp = self.mlp
        return [Part("value", mlp if isinstance(mlp, nn.Linear) else mlp[0], "steps" if self.per_step else "last")]

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = parts["value"]
        if isinstance(self.mlp, nn.Sequential):   # the layers after the first
            x = self.mlp[1:](x)
        if self.per_step:   # [steps, 2] logits -> P(step is right)
            return {"step_rewards": torch.softmax(x.float(), dim=-1)[:, 1]}
        return {"score": x[:, 0].float()}
