"""config.json -> one frozen ModelSpec. Every default and alias is resolved here.

Family detection follows ../shared/spec/reward-models.md:

| family | architectures                                         | extra condition              |
|--------|-------------------------------------------------------|------------------------------|
| bt     | LlamaForSequenceClassification                        |                              |
| armorm | LlamaForRewardModelWithGating                         | no `num_quantiles`           |
| qrm    | LlamaForRewardModelWithGating                         | `num_quantiles` present      |
| urm    | LlamaForSequenceClassificationWithNormal_Weights      |                              |
| grm    | LlamaForCausalLM                                      | `vhead_layer_type` present   |
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

FAMILIES = ("bt", "armorm", "qrm", "urm", "grm")

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
    vhead_layer_type: str = ""           # grm: "mlp" or "linear"
    vhead_num_layers: int = 0            # grm
    vhead_num_neurons: int = 0           # grm
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
    bos_token_id: int | None
    checkpoint_dtype: str | None
    head: HeadSpec = field(default_factory=HeadSpec)
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


def _rope(cfg: dict) -> RopeSpec:
    # transformers<5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters
    # (which carries rope_theta inside).
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
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
        original_max_position=int(params["original_max_position_embeddings"]),
    )


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
    if arch == "LlamaForSequenceClassification":
        return "bt"
    if arch == "LlamaForRewardModelWithGating":
        return "qrm" if "num_quantiles" in cfg else "armorm"
    if arch == "LlamaForSequenceClassificationWithNormal_Weights":
        return "urm"
    if arch == "LlamaForCausalLM":
        if "vhead_layer_type" in cfg:
            return "grm"
        raise ConfigError("LlamaForCausalLM without 'vhead_layer_type' is a language model, not a reward model")
    raise ConfigError(
        f"unsupported architecture '{arch}'; rmserve serves LlamaForSequenceClassification, "
        "LlamaForRewardModelWithGating (ArmoRM, QRM), LlamaForSequenceClassificationWithNormal_Weights "
        "(URM) and LlamaForCausalLM with a value head (GRM)"
    )


def _head(family: str, cfg: dict) -> HeadSpec:
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
            vhead_layer_type=kind,
            vhead_num_layers=int(cfg.get("vhead_num_layers", 1)) if kind == "mlp" else 0,
            vhead_num_neurons=int(cfg.get("vhead_num_neurons", 1024)) if kind == "mlp" else 0,
        )
    raise AssertionError(family)


def spec_from_dict(cfg: dict) -> ModelSpec:
    family = detect_family(cfg)
    if cfg.get("model_type", "llama") != "llama":
        raise ConfigError(f"model_type '{cfg.get('model_type')}' is not a Llama backbone")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError("Llama backbones with attention or MLP biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{cfg['hidden_act']}' is not supported (Llama uses silu)")
    return ModelSpec(
        family=family,
        architecture=cfg["architectures"][0],
        hidden_size=hidden,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(_require(cfg, "intermediate_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope(cfg),
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        checkpoint_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        head=_head(family, cfg),
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
