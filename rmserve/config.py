"""config.json -> one frozen ModelSpec. Every default and alias is resolved here.

Family detection follows ../shared/spec/reward-models.md and more-models.md:

| family   | architectures                                          | backbone | extra condition            |
|----------|--------------------------------------------------------|----------|----------------------------|
| bt       | LlamaForSequenceClassification                         | llama    |                            |
| bt       | Qwen2ForSequenceClassification                         | qwen2    |                            |
| bt       | Qwen3ForSequenceClassification                         | qwen3    |                            |
| armorm   | LlamaForRewardModelWithGating                          | llama    | no `num_quantiles`         |
| qrm      | LlamaForRewardModelWithGating                          | llama    | `num_quantiles` present    |
| urm      | LlamaForSequenceClassificationWithNormal_Weights       | llama    |                            |
| grm      | LlamaForCausalLM                                       | llama    | `vhead_layer_type` present |
| qwen2_rm | Qwen2ForRewardModel (Qwen2.5-Math-RM)                  | qwen2    |                            |
| qwen2_prm| Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM)          | qwen2    |                            |

The backbones differ only in what BACKBONES lists (the defaults of transformers' LlamaConfig /
Qwen2Config / Qwen3Config for absent keys, and q/k/v bias or per-head q/k RMSNorm); one decoder
(rmserve/model/decoder.py) runs all three from the ModelSpec.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

FAMILIES = ("bt", "armorm", "qrm", "urm", "grm", "qwen2_rm", "qwen2_prm")

ARMO_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence",
    "helpsteer-complexity", "helpsteer-verbosity",
    "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness",
    "beavertails-is_safe", "prometheus-score",
    "argilla-overall_quality", "argilla-judge_lm",
    "code-complexity", "code-style", "code-explanation",
    "code-instruction-following", "code-readability",
)
URM_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


class ConfigError(ValueError):
    """The checkpoint's config.json is not a reward model rmserve can serve."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a `model_type` means, read from transformers 5's config and modeling files."""
    max_position_embeddings: int    # default when config.json has none
    head_dim: int | None            # default head_dim; None: hidden_size // num_attention_heads
    qkv_bias: bool                  # q/k/v projections always carry a bias (Qwen2: hard-coded; o_proj none)
    qk_norm: bool                   # RMSNorm over head_dim on each head's q and k, before RoPE (Qwen3)
    sliding_window_keys: bool       # the config class reads use_sliding_window / sliding_window / layer_types
    bias_keys: tuple[str, ...]      # keys that put biases on projections rmserve runs without them


BACKBONES = {
    # LlamaConfig: head_dim None -> hidden // heads; attention_bias puts a bias on q, k, v AND o; mlp_bias on
    # the MLP. LlamaAttention reads no sliding-window key.
    "llama": BackboneSpec(max_position_embeddings=2048, head_dim=None, qkv_bias=False, qk_norm=False,
                          sliding_window_keys=False, bias_keys=("attention_bias", "mlp_bias")),
    # Qwen2Config has no head_dim field (Qwen2Attention: getattr(config, "head_dim", hidden // heads)) and
    # no attention_bias: q/k/v always have a bias, o_proj never.
    "qwen2": BackboneSpec(max_position_embeddings=32768, head_dim=None, qkv_bias=True, qk_norm=False,
                          sliding_window_keys=True, bias_keys=()),
    # Qwen3Config: head_dim defaults to 128 (not hidden // heads); attention_bias on q, k, v and o.
    "qwen3": BackboneSpec(max_position_embeddings=32768, head_dim=128, qkv_bias=False, qk_norm=True,
                          sliding_window_keys=True, bias_keys=("attention_bias",)),
}

# architecture -> (family, model_type); LlamaForRewardModelWithGating and LlamaForCausalLM need more keys.
ARCHITECTURES = {
    "LlamaForSequenceClassification": ("bt", "llama"),
    "Qwen2ForSequenceClassification": ("bt", "qwen2"),
    "Qwen3ForSequenceClassification": ("bt", "qwen3"),
    "LlamaForRewardModelWithGating": ("armorm", "llama"),
    "LlamaForSequenceClassificationWithNormal_Weights": ("urm", "llama"),
    "LlamaForCausalLM": ("grm", "llama"),
    "Qwen2ForRewardModel": ("qwen2_rm", "qwen2"),
    "Qwen2ForProcessRewardModel": ("qwen2_prm", "qwen2"),
}

# Qwen2.5-Math-PRM's step token, from its model card (huggingface.co/Qwen/Qwen2.5-Math-PRM-7B, README at
# 0610740): the answer is `"<extra_0>".join(steps) + "<extra_0>"` and `step_sep_id =
# tokenizer.encode("<extra_0>")[0]`. Its id is looked up in the checkpoint's own tokenizer (steps.step_format),
# never assumed (151651 there; vLLM hard-codes that id as the STEP pooler's step_tag_id).
PRM_STEP_TOKEN = "<extra_0>"


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    # llama3 scaling; None means plain RoPE.
    llama3_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class HeadSpec:
    """Family-specific head shape. Fields that a family does not use keep their defaults."""
    num_labels: int = 1                  # bt: rows of score.weight; urm: 2 * attributes
    num_objectives: int = 0              # armorm / qrm
    num_quantiles: int = 0               # qrm
    gating_temperature: float = 1.0      # armorm / qrm
    gating_hidden_dim: int = 0           # armorm / qrm
    gating_n_hidden: int = 0             # armorm / qrm
    # value heads (heads/value.py): grm's v_head.summary and Qwen2ForRewardModel's score MLP
    vhead_prefix: str = ""               # checkpoint name of the head module: "v_head.summary" | "score"
    vhead_layer_type: str = ""           # "mlp" or "linear"
    vhead_num_layers: int = 0            # hidden Linear+ReLU layers
    vhead_num_neurons: int = 0           # their width
    vhead_outputs: int = 1               # outputs of the last Linear (a process reward model has 2)
    step_token: str = ""                 # process reward models: the token marking each step ("": none)
    names: tuple[str, ...] = ()          # objective / attribute names, in output order


@dataclass(frozen=True)
class ModelSpec:
    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: int | None
    # config.json's bos_token_id as written; which BOS a sample gets is the tokenizer's (inputs.py): Qwen
    # configs name <|endoftext|> here although their tokenizers have no BOS.
    bos_token_id: int | None
    checkpoint_dtype: str | None
    head: HeadSpec = field(default_factory=HeadSpec)
    model_type: str = "llama"            # the backbone: llama | qwen2 | qwen3 (see BACKBONES)
    qkv_bias: bool = False               # q/k/v projections carry biases (fused into qkv_proj.bias)
    qk_norm: bool = False                # per-head RMSNorm of q and k before RoPE (q_norm / k_norm weights)
    # config.json's classifier metadata, read only by the vLLM-style /classify route (its activation
    # and `label`): `problem_type` as written (None: absent) and `id2label` in index order (() : absent).
    problem_type: str | None = None
    id2label: tuple[str, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _require(cfg: dict, key: str):
    if key not in cfg:
        raise ConfigError(f"config.json has no '{key}'")
    return cfg[key]


def _rope(cfg: dict, layer_types: list[str], max_positions: int) -> RopeSpec:
    # transformers<5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters (which carries
    # rope_theta inside). As transformers 5 reads them: rope_scaling, if set, replaces rope_parameters;
    # the theta inside wins over a top-level rope_theta, which wins over the default 10000.
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if any(key in layer_types for key in params):
        raise ConfigError("per-layer-type RoPE parameters are not supported")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor {partial} is not supported (only full rotary embeddings)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return RopeSpec(theta=theta)
    if kind != "llama3":
        raise ConfigError(f"rope type '{kind}' is not supported (only default and llama3)")
    return RopeSpec(
        theta=theta,
        llama3_factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        # transformers 5 fills it from max_position_embeddings when absent
        original_max_position=int(params.get("original_max_position_embeddings") or max_positions),
    )


def _max_positions(cfg: dict, backbone: BackboneSpec) -> int:
    return int(cfg.get("max_position_embeddings") or backbone.max_position_embeddings)


def _layer_types(cfg: dict, backbone: BackboneSpec, num_layers: int, max_positions: int) -> list[str]:
    """Each layer's attention as transformers 5's Qwen2Config / Qwen3Config derive it: the window is
    `sliding_window` only with `use_sliding_window`, and layer_types (if absent) slides layers from
    max_window_layers on. A window that covers max_position_embeddings changes nothing (no sample is
    longer): accepted. Any other sliding layer is refused (transformers itself refuses a sliding layer
    with no window in effect): rmserve's attention is full and causal."""
    if not backbone.sliding_window_keys:
        return ["full_attention"] * num_layers   # LlamaAttention never reads a window
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    kinds = cfg.get("layer_types")
    if kinds is None:
        first = int(cfg.get("max_window_layers", 28))
        kinds = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(num_layers)]
    if len(kinds) != num_layers or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"layer_types must name full_attention or sliding_attention for each of the "
                          f"{num_layers} layers, got {kinds!r}")
    if "sliding_attention" in kinds and (window is None or int(window) < max_positions):
        raise ConfigError(f"sliding-window attention (window {window}, max_position_embeddings {max_positions}) "
                          "is not supported; rmserve runs full causal attention only")
    return kinds


def _num_labels(cfg: dict) -> int:
    # HF derives num_labels from id2label; with neither key, PretrainedConfig defaults to 2.
    if "id2label" in cfg:
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


def detect_family(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise ConfigError(f"config.json must name exactly one architecture, got {archs!r}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported architecture '{arch}'; rmserve serves {', '.join(sorted(ARCHITECTURES))} "
            "(see README's family table)")
    if arch == "LlamaForRewardModelWithGating":
        return "qrm" if "num_quantiles" in cfg else "armorm"
    if arch == "LlamaForCausalLM" and "vhead_layer_type" not in cfg:
        raise ConfigError("LlamaForCausalLM without 'vhead_layer_type' is a language model, not a reward model")
    return ARCHITECTURES[arch][0]


def _head(family: str, cfg: dict, hidden: int) -> HeadSpec:
    if family == "bt":
        return HeadSpec(num_labels=_num_labels(cfg))
    if family in ("armorm", "qrm"):
        n_obj = int(_require(cfg, "num_objectives"))
        names = ARMO_OBJECTIVES if n_obj == len(ARMO_OBJECTIVES) else tuple(f"objective_{i}" for i in range(n_obj))
        return HeadSpec(
            num_objectives=n_obj,
            num_quantiles=int(cfg["num_quantiles"]) if family == "qrm" else 0,
            gating_temperature=float(_require(cfg, "gating_temperature")),
            gating_hidden_dim=int(_require(cfg, "gating_hidden_dim")),
            gating_n_hidden=int(_require(cfg, "gating_n_hidden")),
            names=names,
        )
    if family == "urm":
        n = _num_labels(cfg)
        if n % 2:
            raise ConfigError(f"URM needs an even num_labels (mean, spread pairs), got {n}")
        names = URM_ATTRIBUTES if n // 2 == len(URM_ATTRIBUTES) else tuple(f"attribute_{i}" for i in range(n // 2))
        return HeadSpec(num_labels=n, names=names)
    if family == "grm":
        kind = cfg["vhead_layer_type"]
        if kind not in ("mlp", "linear"):
            raise ConfigError(f"GRM vhead_layer_type must be 'mlp' or 'linear', got {kind!r}")
        return HeadSpec(
            vhead_prefix="v_head.summary",
            vhead_layer_type=kind,
            vhead_num_layers=int(cfg.get("vhead_num_layers", 1)) if kind == "mlp" else 0,
            vhead_num_neurons=int(cfg.get("vhead_num_neurons", 1024)) if kind == "mlp" else 0,
        )
    if family == "qwen2_rm":
        # Qwen2.5-Math-RM's remote code hard-codes num_labels = 1 and
        # score = Linear(hidden, hidden, bias) -> ReLU -> Linear(hidden, 1, bias) (see heads/value.py).
        return HeadSpec(vhead_prefix="score", vhead_layer_type="mlp", vhead_num_layers=1,
                        vhead_num_neurons=hidden, vhead_outputs=1)
    if family == "qwen2_prm":
        # The same MLP with 2 outputs, read at every step token (heads/value.py): Qwen2.5-Math-PRM's remote code
        # and vLLM's port (vllm/model_executor/models/qwen2_rm.py, Qwen2ForProcessRewardModel, commit
        # 002b4cf80b730f384dbc7d5f85db8a10b14af56a) hard-code num_labels = 2, whatever config.json says.
        return HeadSpec(vhead_prefix="score", vhead_layer_type="mlp", vhead_num_layers=1,
                        vhead_num_neurons=hidden, vhead_outputs=2, step_token=PRM_STEP_TOKEN)
    raise AssertionError(family)


def spec_from_dict(cfg: dict) -> ModelSpec:
    family = detect_family(cfg)
    arch = cfg["architectures"][0]
    model_type = ARCHITECTURES[arch][1]
    if cfg.get("model_type", model_type) != model_type:
        raise ConfigError(f"{arch} needs model_type '{model_type}', config.json says '{cfg.get('model_type')}'")
    backbone = BACKBONES[model_type]
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    layers = int(_require(cfg, "num_hidden_layers"))
    biased = [k for k in backbone.bias_keys if cfg.get(k)]
    if biased:
        raise ConfigError(f"{model_type} backbones with {' / '.join(biased)} (biases on the attention or MLP "
                          "projections, o_proj included) are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{cfg['hidden_act']}' is not supported ({model_type} uses silu)")
    max_positions = _max_positions(cfg, backbone)
    layer_types = _layer_types(cfg, backbone, layers, max_positions)
    # tie_word_embeddings (Llama-3.2, Qwen3 0.6B-4B) only ties lm_head to embed_tokens: scoring reads
    # hidden states, never lm_head, so it changes nothing here (the loader ignores an lm_head on disk).
    return ModelSpec(
        family=family,
        architecture=arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or backbone.head_dim or hidden // heads),
        intermediate_size=int(_require(cfg, "intermediate_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),   # the default of all three config classes
        rope=_rope(cfg, layer_types, max_positions),
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position_embeddings=max_positions,
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        head=_head(family, cfg, hidden),
        model_type=model_type,
        qkv_bias=backbone.qkv_bias,
        qk_norm=backbone.qk_norm,
        problem_type=cfg.get("problem_type"),
        id2label=_id2label(cfg),
    )


def _id2label(cfg: dict) -> tuple[str, ...]:
    labels = cfg.get("id2label") or {}
    try:
        return tuple(str(labels[k]) for k in sorted(labels, key=int))
    except (TypeError, ValueError):
        raise ConfigError(f"config.json's id2label keys must be integers, got {sorted(labels)}") from None


def load_spec(model_dir: str) -> ModelSpec:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{model_dir} has no config.json")
    with open(path, encoding="utf-8") as f:
        return spec_from_dict(json.load(f))
