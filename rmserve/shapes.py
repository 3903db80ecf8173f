"""The real shapes of the models rmserve serves, in one table, and models of those shapes built in memory.

BACKBONES: the backbone part of each supported checkpoint's config.json (sizes, RoPE, vocabulary).
HEADS: each family's head part, as the published checkpoints (../shared/spec) have it.
`config(backbone, family, layers=None)` joins one of each into a complete config.json (the
architecture follows the backbone: a BT head on Qwen3 is Qwen3ForSequenceClassification);
`families(backbone)` names the heads its published checkpoints have;
`model_of_shape(config, device, dtype, fill=None)` builds that model with no checkpoint.

Read by the kernel compile test (tests/test_kernel_compile.py runs every backbone x its families as a
one-layer engine and compiles each kernel launch it records), the benchmarks (bench/rmbench.py)
and the GPU lease's checkpoint (bench/write_checkpoint.py). A new architecture or shape is one
entry here: those all pick it up.
"""
from __future__ import annotations

from typing import Callable

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
LLAMA32_ROPE = {**LLAMA3_ROPE, "factor": 32.0}
_QWEN3 = {"model_type": "qwen3", "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
          "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False, "use_sliding_window": False,
          "sliding_window": None}
_QWEN25_MATH = {"model_type": "qwen2", "vocab_size": 152064, "max_position_embeddings": 4096, "hidden_act": "silu",
                "rope_theta": 10000.0, "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": False,
                "use_sliding_window": False}
_LLAMA32 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "rope_parameters": LLAMA32_ROPE, "bos_token_id": 128000, "eos_token_id": 128009,
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False}

BACKBONES: dict[str, dict] = {
    # Llama-3.1-8B (Skywork-Reward, QRM, URM; Llama-3-8B's ArmoRM, FsfairX and GRM have the same
    # layer shapes, with plain RoPE and 8192 positions: the kernels see the same shapes).
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": LLAMA3_ROPE, "bos_token_id": 128000, "eos_token_id": 128009,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    },
    # Skywork-Reward-V2-Llama-3.2-1B / 3B (hidden / layers / q heads / kv heads / intermediate from
    # ../shared/spec/more-models.md; 1B's head_dim is 64)
    "llama-3.2-1b": {**_LLAMA32, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192},
    "llama-3.2-3b": {**_LLAMA32, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192},
    # Skywork-Reward-V2-Qwen3-0.6B / 8B: head_dim 128 whatever the width (0.6B: q_size 2048 != hidden 1024)
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "intermediate_size": 3072, "tie_word_embeddings": True,
                   "max_window_layers": 28},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 12288, "tie_word_embeddings": False,
                 "max_window_layers": 36},
    # Qwen2.5-Math-RM-72B (Qwen2: q/k/v biases; head_dim = hidden / heads = 128)
    "qwen2.5-math-rm-72b": {**_QWEN25_MATH, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                            "num_key_value_heads": 8, "intermediate_size": 29568, "rms_norm_eps": 1e-6,
                            "sliding_window": 4096, "max_window_layers": 80},
    # Qwen2.5-Math-PRM-7B (the Qwen2ForProcessRewardModel head on Qwen2.5-Math-7B's backbone): sizes from
    # ../shared/spec/more-models.md; theta, eps, positions and window from a public copy of its config.json
    # (Rong-yyc/Notes, AI_security/Transformer.md): rope_theta 10000, rms_norm_eps 1e-05 (not Qwen2's usual
    # 1e-6), max_position_embeddings 4096, sliding_window 131072 with use_sliding_window false.
    "qwen2.5-math-prm-7b": {**_QWEN25_MATH, "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                            "num_key_value_heads": 4, "intermediate_size": 18944, "rms_norm_eps": 1e-5,
                            "sliding_window": 131072, "max_window_layers": 28},
}

HEADS: dict[str, dict] = {
    "bt": {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"},
           "label2id": {"LABEL_0": 0}},
    "armorm": {"architectures": ["LlamaForRewardModelWithGating"], "num_objectives": 19,
               "gating_temperature": 10.0, "gating_hidden_dim": 1024, "gating_n_hidden": 3},
    # The gating MLP's width is not in the spec; QRM's code is ArmoRM's (1024, 3 hidden blocks).
    "qrm": {"architectures": ["LlamaForRewardModelWithGating"], "num_objectives": 19, "num_quantiles": 19,
            "gating_temperature": 5.0, "gating_hidden_dim": 1024, "gating_n_hidden": 3},
    "urm": {"architectures": ["LlamaForSequenceClassificationWithNormal_Weights"],
            "id2label": {str(i): f"LABEL_{i}" for i in range(10)}, "label2id": {f"LABEL_{i}": i for i in range(10)}},
    "grm": {"architectures": ["LlamaForCausalLM"], "vhead_layer_type": "mlp", "vhead_num_layers": 1,
            "vhead_num_neurons": 1024},
    # the score MLP's width is the backbone's hidden size (config.py)
    "qwen2_rm": {"architectures": ["Qwen2ForRewardModel"]},
    "qwen2_prm": {"architectures": ["Qwen2ForProcessRewardModel"]},
}


def _architecture(family: str, model_type: str) -> str | None:
    """The config.json architecture of `family`'s head on a `model_type` backbone (None: no such model)."""
    from .config import ARCHITECTURES

    arch = HEADS[family]["architectures"][0]
    if ARCHITECTURES[arch][1] == model_type:
        return arch
    return next((a for a, (f, m) in ARCHITECTURES.items() if (f, m) == (family, model_type)), None)


# The families of the published checkpoints of each backbone (llama-3.1-8b: all of the Llama ones).
CHECKPOINTS = {"llama-3.2-1b": ("bt",), "llama-3.2-3b": ("bt",), "qwen3-0.6b": ("bt",), "qwen3-8b": ("bt",),
               "qwen2.5-math-rm-72b": ("qwen2_rm",), "qwen2.5-math-prm-7b": ("qwen2_prm",)}


def families(backbone: str) -> list[str]:
    """The families (config.FAMILIES order) of the published checkpoints on BACKBONES[backbone]:
    CHECKPOINTS, or every family whose head exists on that backbone."""
    from .config import FAMILIES

    valid = [f for f in FAMILIES if _architecture(f, BACKBONES[backbone]["model_type"]) is not None]
    return [f for f in valid if f in CHECKPOINTS.get(backbone, valid)]


def config(backbone: str | dict, family: str, layers: int | None = None) -> dict:
    """config.json of `family`'s head on `backbone` (a BACKBONES name or its dict); layers overrides the depth."""
    base = BACKBONES[backbone] if isinstance(backbone, str) else backbone
    arch = _architecture(family, base.get("model_type", "llama"))
    if arch is None:
        raise ValueError(f"no {family} model on a {base.get('model_type')} backbone")
    cfg = {**base, **HEADS[family], "architectures": [arch]}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


@torch.no_grad()
def model_of_shape(cfg: dict, device: str | torch.device, dtype: torch.dtype,
                   fill: Callable[[str, torch.Tensor], None] | None = None):
    """rmserve's backbone and head for config.json `cfg`, built on `device` without a checkpoint:
    every parameter in its dtype (the head's per `heads.PRECISION`), allocated uninitialised and
    then passed to fill(name, tensor) when given (no fp32 copy of 8B). Buffers are zero.
    -> loader.LoadedModel (path "memory")."""
    from .config import spec_from_dict
    from .heads import build_head, head_param_dtype
    from .loader import LoadedModel
    from .model.decoder import Backbone
    from .model.rope import inv_freq

    spec = spec_from_dict(cfg)
    dev = torch.device(device)
    with torch.device("meta"):
        backbone, head = Backbone(spec), build_head(spec)
    for module, dtype_of in ((backbone, lambda n: dtype), (head, lambda n: head_param_dtype(spec.family, n, dtype))):
        for mod_name, mod in module.named_modules():
            for name, t in list(mod._parameters.items()):
                if t is None:
                    continue
                full = f"{mod_name}.{name}" if mod_name else name
                new = torch.empty(t.shape, dtype=dtype_of(full), device=dev)
                if fill is not None:
                    fill(full, new)
                mod._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
            for name, t in list(mod._buffers.items()):
                if t is not None and name != "inv_freq":
                    mod._buffers[name] = torch.zeros(t.shape, dtype=t.dtype, device=dev)
    backbone.inv_freq = inv_freq(spec.rope, spec.head_dim).to(dev)
    return LoadedModel(spec=spec, backbone=backbone.eval(), head=head.eval(), path="memory")
