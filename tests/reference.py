"""The test oracle: transformers' LlamaModel (Qwen2Model, Qwen3Model for those backbones) hidden
states plus each family's head written plainly from ../shared/spec/reward-models.md and
more-models.md, on the checkpoint's own files (a process reward model's step rewards as its model
card computes them: `card_step_rewards`).

Deliberately independent of rmserve's model and heads: it reads the safetensors itself,
runs one sequence at a time with no packing, and does the head math in fp32 (or in the
dtype given) with plain tensor operations.
"""
from __future__ import annotations

import glob
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def read_checkpoint(model_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update(load_file(path))
    return cfg, tensors


def hf_backbone(cfg: dict, tensors: dict[str, torch.Tensor], dtype=torch.float32, device="cpu"):
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[cfg.get("model_type", "llama")]
    config_class, model_class = getattr(transformers, name + "Config"), getattr(transformers, name + "Model")
    keys = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")}
    config = config_class(**keys)
    config._attn_implementation = "eager"
    model = model_class(config).to(device=device).eval()
    # Module.to(dtype) would round the RoPE inverse frequencies to bf16 too (angle errors ~0.1 rad
    # at position 100); from_pretrained(torch_dtype=...) keeps them fp32, so the oracle does too.
    inv_freq = model.rotary_emb.inv_freq
    model = model.to(dtype=dtype)
    model.rotary_emb.inv_freq = inv_freq
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    assert not unexpected, unexpected
    return model


@torch.no_grad()
def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    """Final hidden states (after the last RMSNorm) of one unpadded sequence: [L, hidden]."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device))
    return out.last_hidden_state[0]


def _lin(x, t, name, bias=True):
    y = x @ t[name + ".weight"].to(x.dtype).T
    if bias and name + ".bias" in t:
        y = y + t[name + ".bias"].to(x.dtype)
    return y


def head_ref(cfg: dict, t: dict[str, torch.Tensor], h: torch.Tensor, g_in: torch.Tensor | None,
             dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Spec math for one sample. h, g_in: [hidden]. Returns fp32 outputs."""
    arch = cfg["architectures"][0]
    h = h.to(dtype)[None]
    if arch == "LlamaForSequenceClassification":
        logits = _lin(h, t, "score", bias=False)[0].float()
        return {"score": logits[0]} if logits.numel() == 1 else {"logits": logits}
    if arch == "LlamaForSequenceClassificationWithNormal_Weights":
        s = _lin(h, t, "score", bias=False)[0].float()
        mu, spread = s[0::2], s[1::2]
        wdt = torch.float16 if dtype != torch.float32 else torch.float32
        x = h.to(wdt)
        x = F.selu(_lin(x, t, "weights.fc.0"))
        x = F.selu(_lin(x, t, "weights.fc.2"))
        w = _lin(x, t, "weights.fc.4")[0].float()
        return {"score": (mu * w).sum(), "means": mu, "spreads": spread, "sigmas": torch.exp(0.5 * spread), "weights": w}
    if arch == "Qwen2ForRewardModel":   # score = Linear(h, h) -> ReLU -> Linear(h, 1), biases, last token
        return {"score": _lin(F.relu(_lin(h, t, "score.0")), t, "score.2")[0, 0].float()}
    if arch == "LlamaForCausalLM":
        if cfg["vhead_layer_type"] == "linear":
            return {"score": _lin(h, t, "v_head.summary")[0, 0].float()}
        x = h
        n = cfg["vhead_num_layers"]
        for i in range(n):
            x = F.relu(_lin(x, t, f"v_head.summary.{2 * i}"))
        return {"score": _lin(x, t, f"v_head.summary.{2 * n}")[0, 0].float()}
    assert arch == "LlamaForRewardModelWithGating"
    qrm = "num_quantiles" in cfg
    if qrm:
        dtype = torch.float32   # QRM's reference runs its head in fp32
        h = h.float()
    g = g_in.to(dtype)[None]
    n_hidden, n_obj = cfg["gating_n_hidden"], cfg["num_objectives"]
    for i in range(n_hidden):
        if qrm:
            g = F.relu(_lin(g, t, f"gating.layers.{3 * i}", bias=False))
            bn = f"gating.layers.{3 * i + 2}"
            g = (g - t[bn + ".running_mean"]) / torch.sqrt(t[bn + ".running_var"] + 1e-5) * t[bn + ".weight"] + t[bn + ".bias"]
        else:
            g = F.relu(_lin(g, t, f"gating.layers.{i}"))
    u = _lin(g, t, f"gating.layers.{3 * n_hidden if qrm else n_hidden}")
    gates = (torch.softmax(u / cfg["gating_temperature"], dim=-1) * t["gating.logit_scale"].to(dtype))[0]
    tm = t.get("reward_transform_matrix", torch.eye(n_obj)).to(dtype)
    if not qrm:
        r = _lin(h, t, "regression_layer", bias=False)[0]
        score = (gates * (r @ tm)).sum()
        return {"score": score.float(), "rewards": r.float(), "gating": gates.float(),
                "coefficients": (gates @ tm.T).float()}
    nq = cfg["num_quantiles"]
    R = _lin(h, t, "regression_layer", bias=False)[0].view(n_obj, nq)
    mu = R.mean(dim=1)
    rewards = mu @ tm
    mixture = torch.stack([(gates * (R[:, k] @ tm)).sum() for k in range(nq)])
    return {"score": (gates * rewards).sum(), "rewards": rewards, "gating": gates,
            "reward_quantiles": mixture, "quantiles": R}


def card_step_rewards(t: dict[str, torch.Tensor], hidden: torch.Tensor, ids: list[int], step_id: int,
                      dtype=torch.float32) -> list[float]:
    """Qwen2.5-Math-PRM's step rewards the way its model card computes them
    (huggingface.co/Qwen/Qwen2.5-Math-PRM-7B, README at 0610740, `make_step_rewards`): the score MLP
    (score.0 -> ReLU -> score.2, 2 outputs) on every token's hidden state, softmax over the 2 logits,
    zeroed outside `input_ids == step_sep_id` (every step token of the input, the user's included),
    then `sample[sample != 0].view(-1, 2)[:, 1]`. hidden: [L, hidden] of one sequence."""
    logits = _lin(F.relu(_lin(hidden.to(dtype), t, "score.0")), t, "score.2").float()
    probabilities = F.softmax(logits, dim=-1) * (torch.tensor(ids) == step_id).unsqueeze(-1)
    return probabilities[probabilities != 0].view(-1, 2)[:, 1].tolist()


class Reference:
    """Reference scores for token-id samples of one checkpoint."""

    def __init__(self, model_dir: str, dtype=torch.float32, device="cpu"):
        self.cfg, self.tensors = read_checkpoint(model_dir)
        self.dtype = dtype
        self.model = hf_backbone(self.cfg, self.tensors, dtype, device)

    def outputs(self, ids: list[int], gate: int | None) -> dict[str, torch.Tensor]:
        hidden = hf_hidden(self.model, ids)
        return head_ref(self.cfg, self.tensors, hidden[-1], None if gate is None else hidden[gate], self.dtype)

    def step_rewards(self, ids: list[int], step_id: int) -> list[float]:
        """A process reward model's rewards at every step token of `ids`, the model card's way."""
        return card_step_rewards(self.tensors, hf_hidden(self.model, ids), ids, step_id, self.dtype)
