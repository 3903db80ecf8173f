"""Tiny random-weight checkpoints of every family, in the real on-disk format.

config.json with the family's `architectures` and keys, safetensors with the real tensor names
(optionally sharded with model.safetensors.index.json), and a byte-level BPE tokenizer whose special
tokens behave like the real model's: the Llama 3 ones (BOS `<|begin_of_text|>`, added by the
tokenizer) or Qwen's (ChatML, `<think>`/`</think>`, no BOS at all), with a chat template written after
the real one (rmserve/tiny_templates.py). Scores from these are meaningless; they exist for tests,
smoke runs and `--model tiny:<preset>` (PRESETS).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import save_file

from .config import FAMILIES, PRM_STEP_TOKEN
from .tiny_templates import TEMPLATES

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PAD_TOKEN = "[PAD]"
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_ADDED_TOKENS = ("<think>", "</think>")   # added, not special, as in Qwen3's tokenizer.json

# The Llama 3 tokenizer's pre-tokenizer split (its "\n\n" after a header is one piece).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/Qwen3's: the same but one digit per piece.
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# Words whose byte-level merges the tiny tokenizer learns (so common words are one token).
_WORDS = ("assistant", "user", "system", " the", " and", " you", " is", " to", " of", " a", " in", " that",
          " it", " for", " with", " are", " can", " what", " how", " this", " be", " on", " not", " your",
          " have", " do", " as", " or", " I", " my", "Hello", " Hi", " please", " answer", " question")

# (family, backbone) -> config.json architecture.
ARCHITECTURES = {
    ("bt", "llama"): "LlamaForSequenceClassification",
    ("bt", "llama32"): "LlamaForSequenceClassification",
    ("bt", "qwen2"): "Qwen2ForSequenceClassification",
    ("bt", "qwen3"): "Qwen3ForSequenceClassification",
    ("armorm", "llama"): "LlamaForRewardModelWithGating",
    ("qrm", "llama"): "LlamaForRewardModelWithGating",
    ("urm", "llama"): "LlamaForSequenceClassificationWithNormal_Weights",
    ("grm", "llama"): "LlamaForCausalLM",
    ("qwen2_rm", "qwen2"): "Qwen2ForRewardModel",
    ("qwen2_prm", "qwen2"): "Qwen2ForProcessRewardModel",
}
# Per family, as the published checkpoints are: backbone, its generation and template style.
FAMILY_DEFAULTS = {
    "bt": {"backbone": "llama", "llama31": True, "template": "llama3_nobos"},     # Skywork-Reward-Llama-3.1
    "armorm": {"backbone": "llama", "llama31": False, "template": "llama3"},      # ArmoRM-Llama3-8B
    "qrm": {"backbone": "llama", "llama31": True, "template": "llama3"},          # QRM-Llama3.1-8B
    "urm": {"backbone": "llama", "llama31": True, "template": "llama3_nobos"},    # URM-LLaMa-3.1-8B
    "grm": {"backbone": "llama", "llama31": False, "template": "llama3"},         # GRM-llama3-8B-sftreg
    "qwen2_rm": {"backbone": "qwen2", "template": "chatml"},                      # Qwen2.5-Math-RM-72B
    "qwen2_prm": {"backbone": "qwen2", "template": "chatml"},                     # Qwen2.5-Math-PRM-7B
}
# Per backbone: model_type, tokenizer, default template, and the config keys the real checkpoints carry.
# llama32: Skywork-Reward-V2-Llama-3.2-1B/3B (llama3 RoPE scaling with factor 32, tied embeddings);
# qwen3: Skywork-Reward-V2-Qwen3 (explicit head_dim: q_size = 2 x hidden here, theta 1e6, eps 1e-6, tied);
# qwen2: Qwen2.5-Math-RM (q/k/v biases, theta 10000; a sliding_window key that use_sliding_window turns off).
BACKBONES = {
    "llama": {"model_type": "llama", "tokenizer": "llama3", "template": "llama3_nobos"},
    "llama32": {"model_type": "llama", "tokenizer": "llama3", "template": "llama32"},
    "qwen3": {"model_type": "qwen3", "tokenizer": "qwen", "template": "qwen3"},
    "qwen2": {"model_type": "qwen2", "tokenizer": "qwen", "template": "chatml"},
}


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer(path: str, template: str = "llama3", style: str = "llama3", extra_special: tuple[str, ...] = ()
                    ) -> int:
    """Writes tokenizer.json and tokenizer_config.json; returns the vocabulary size (special tokens included).

    style "llama3": Llama 3's special tokens plus [PAD]; the tokenizer adds BOS (<|begin_of_text|>).
    style "qwen": Qwen's <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), and <think>, </think> as
    plain added tokens; NFC normalisation, one digit per pre-token piece, and no BOS token at all.
    extra_special: more special tokens after those (Qwen2.5-Math-PRM's step token <extra_0>: an added
    special token, split out of any text wherever it is written, as in the real tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    if style not in ("llama3", "qwen"):
        raise ValueError(f"unknown tokenizer style {style!r}")
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    for word in _WORDS + ("\n\n",):
        pieces = [p for p, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(word)]
        chars = list(pieces[0])
        left = chars[0]
        for ch in chars[1:]:
            merged = left + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, ch))
            left = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS) + list(extra_special))
        tok.add_tokens(list(QWEN_ADDED_TOKENS))
        special = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
    else:
        tok.add_special_tokens(list(SPECIAL_TOKENS) + [PAD_TOKEN] + list(extra_special))
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)])
        special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": PAD_TOKEN}
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        **special,
        "chat_template": TEMPLATES[template],
        "clean_up_tokenization_spaces": style == "llama3",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return tok.get_vocab_size()


def _config(family: str, backbone: str, ids: dict, *, hidden: int, layers: int, heads: int, kv_heads: int,
            head_dim: int, intermediate: int, llama31: bool, style: str, dtype: str,
            max_position_embeddings: int | None, head: dict) -> dict:
    if backbone in ("llama", "llama32"):
        factor = 32.0 if backbone == "llama32" else 8.0 if llama31 else None
        rope = ({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192} if factor else None)
        theta, max_pos, eps, tied = 500000.0, 131072 if factor else 8192, 1e-5, backbone == "llama32"
        extra = {"attention_bias": False, "mlp_bias": False}
    else:
        rope, eps, tied = None, 1e-6, backbone == "qwen3"
        theta, max_pos = (1000000.0, 40960) if backbone == "qwen3" else (10000.0, 4096)
        extra = {"attention_bias": False} if backbone == "qwen3" else {}
        extra.update({"use_sliding_window": False, "sliding_window": None if backbone == "qwen3" else 4096,
                      "max_window_layers": layers})
    cfg = {
        "architectures": [ARCHITECTURES[(family, backbone)]],
        "model_type": BACKBONES[backbone]["model_type"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": eps, "vocab_size": ids["vocab"],
        "max_position_embeddings": max_position_embeddings or max_pos,
        **extra, "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
    }
    if backbone == "qwen2":
        del cfg["head_dim"]   # Qwen2Config has none: hidden // heads
    if style == "transformers4":   # what the published checkpoints carry
        cfg.update({"rope_theta": theta, "rope_scaling": rope, "torch_dtype": dtype})
    else:                           # what transformers 5 writes
        cfg.update({"rope_parameters": dict(rope or {"rope_type": "default"}, rope_theta=theta), "dtype": dtype})
    if family in ("bt", "urm"):
        n = head["num_labels"]
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(n)}
    if family in ("armorm", "qrm"):
        cfg.update({"num_objectives": head["num_objectives"], "gating_temperature": head["gating_temperature"],
                    "gating_hidden_dim": head["gating_hidden_dim"], "gating_n_hidden": head["gating_n_hidden"],
                    "auto_map": {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}})
        if family == "qrm":
            cfg["num_quantiles"] = head["num_quantiles"]
    if family == "grm":
        cfg.update({"vhead_layer_type": head["vhead_layer_type"], "vhead_num_layers": head["vhead_num_layers"],
                    "vhead_num_neurons": head["vhead_num_neurons"]})
    if family == "qwen2_rm":
        cfg["auto_map"] = {"AutoModel": "modeling_qwen2_rm.Qwen2ForRewardModel"}
    if family == "qwen2_prm":   # Qwen2.5-Math-PRM-7B's config.json carries no num_labels (its code says 2)
        cfg["auto_map"] = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                           "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    return cfg


def _head_shapes(family: str, hidden: int, head: dict) -> dict[str, tuple[int, ...]]:
    if family == "bt":
        return {"score.weight": (head["num_labels"], hidden)}
    if family in ("qwen2_rm", "qwen2_prm"):   # score = Linear(h, h) -> ReLU -> Linear(h, 1 or 2), with biases
        n = 2 if family == "qwen2_prm" else 1
        return {"score.0.weight": (hidden, hidden), "score.0.bias": (hidden,),
                "score.2.weight": (n, hidden), "score.2.bias": (n,)}
    if family == "urm":
        n, a = head["num_labels"], head["num_labels"] // 2
        return {"score.weight": (n, hidden), "weights.fc.0.weight": (hidden, hidden), "weights.fc.0.bias": (hidden,),
                "weights.fc.2.weight": (hidden, hidden), "weights.fc.2.bias": (hidden,),
                "weights.fc.4.weight": (a, hidden), "weights.fc.4.bias": (a,)}
    if family == "grm":
        if head["vhead_layer_type"] == "linear":
            return {"v_head.summary.weight": (1, hidden), "v_head.summary.bias": (1,), "lm_head.weight": None}
        shapes, n_in, hn = {}, hidden, head["vhead_num_neurons"]
        for i in range(head["vhead_num_layers"]):
            shapes[f"v_head.summary.{2 * i}.weight"] = (hn, n_in)
            shapes[f"v_head.summary.{2 * i}.bias"] = (hn,)
            n_in = hn
        last = 2 * head["vhead_num_layers"]
        shapes.update({f"v_head.summary.{last}.weight": (1, hn), f"v_head.summary.{last}.bias": (1,),
                       "lm_head.weight": None})  # None: [vocab, hidden], filled by the caller
        return shapes
    n_obj, hd, nh = head["num_objectives"], head["gating_hidden_dim"], head["gating_n_hidden"]
    dims = [hidden] + [hd] * nh
    shapes = {"regression_layer.weight": ((n_obj * head["num_quantiles"]) if family == "qrm" else n_obj, hidden)}
    for i in range(nh):
        if family == "armorm":
            shapes[f"gating.layers.{i}.weight"] = (dims[i + 1], dims[i])
            shapes[f"gating.layers.{i}.bias"] = (dims[i + 1],)
        else:
            lin, bn = 3 * i, 3 * i + 2
            shapes[f"gating.layers.{lin}.weight"] = (dims[i + 1], dims[i])
            for part in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"gating.layers.{bn}.{part}"] = (dims[i + 1],)
            shapes[f"gating.layers.{bn}.num_batches_tracked"] = ()
    last = nh if family == "armorm" else 3 * nh
    shapes[f"gating.layers.{last}.weight"] = (n_obj, dims[-1])
    shapes[f"gating.layers.{last}.bias"] = (n_obj,)
    shapes["gating.logit_scale"] = (1,)
    if family == "armorm" or head.get("store_transform", True):
        shapes["reward_transform_matrix"] = (n_obj, n_obj)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("num_batches_tracked"):
        return torch.tensor(1000, dtype=torch.int64)
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if name.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1 and name.endswith(".weight"):   # RMSNorm and BatchNorm scales
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name == "gating.logit_scale":
        return 0.5 + torch.rand(shape, generator=g)
    if name == "reward_transform_matrix":
        return torch.eye(shape[0]) + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    if len(shape) == 1:   # biases, BatchNorm affine
        return 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / shape[-1] ** 0.5


def write_tiny_checkpoint(path: str, family: str, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                          heads: int = 4, kv_heads: int = 2, intermediate: int = 160,
                          backbone: str | None = None, llama31: bool | None = None, template: str | None = None,
                          config_style: str = "transformers4", shards: int = 1,
                          dtype: torch.dtype = torch.float32, max_position_embeddings: int | None = None,
                          head_dim: int | None = None, **head_overrides) -> str:
    """Writes a random checkpoint of `family` on `backbone` (BACKBONES; default the family's) to `path`
    (created) and returns `path`. head_dim: default hidden // heads, for qwen3 2 x that (q_size != hidden)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}', expected one of {FAMILIES}")
    defaults = FAMILY_DEFAULTS[family]
    backbone = backbone or defaults["backbone"]
    if (family, backbone) not in ARCHITECTURES:
        raise ValueError(f"no {family} checkpoint on a {backbone} backbone; known: {sorted(ARCHITECTURES)}")
    bb = BACKBONES[backbone]
    llama31 = defaults.get("llama31", False) if llama31 is None else llama31
    head_dim = head_dim or (2 if backbone == "qwen3" else 1) * (hidden // heads)
    head = {"num_labels": 10 if family == "urm" else 1, "num_objectives": 19, "num_quantiles": 19,
            "gating_temperature": 5.0 if family == "qrm" else 10.0, "gating_hidden_dim": 32,
            "gating_n_hidden": 3, "vhead_layer_type": "mlp", "vhead_num_layers": 1, "vhead_num_neurons": 32,
            "store_transform": True}
    unknown = set(head_overrides) - set(head)
    if unknown:
        raise TypeError(f"unknown head settings {sorted(unknown)}")
    head.update(head_overrides)
    os.makedirs(path, exist_ok=True)
    template = template or (defaults["template"] if backbone == defaults["backbone"] else bb["template"])
    vocab = write_tokenizer(path, template, bb["tokenizer"], (PRM_STEP_TOKEN,) if family == "qwen2_prm" else ())
    if bb["tokenizer"] == "llama3":
        ids = {"vocab": vocab, "pad": vocab - 1, "bos": vocab - 1 - len(SPECIAL_TOKENS), "eos": vocab - 2}
    else:   # Qwen configs name <|endoftext|> as bos_token_id although the tokenizer has no BOS
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        ids = {"vocab": vocab, "pad": end, "bos": end, "eos": im_end}
    dtype_name = str(dtype).replace("torch.", "")
    cfg = _config(family, backbone, ids, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, intermediate=intermediate, llama31=llama31, style=config_style,
                  dtype=dtype_name, max_position_embeddings=max_position_embeddings, head=head)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)

    hd = head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
        if backbone == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv_heads * hd,),
                           p + "self_attn.v_proj.bias": (kv_heads * hd,)})
        if backbone == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    shapes["model.norm.weight"] = (hidden,)
    for name, shape in _head_shapes(family, hidden, head).items():
        shapes[name] = shape if shape is not None else (vocab, hidden)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        t = _random_tensor(name, shape, g)
        # Real gating checkpoints store their head in fp32 beside a bf16 backbone.
        keep_fp32 = family in ("armorm", "qrm") and not name.startswith("model.")
        tensors[name] = t if (not t.is_floating_point() or keep_fp32) else t.to(dtype)
    _save(path, tensors, shards)
    return path


def _save(path: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(path, fname), metadata=meta)
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# `--model tiny:<name>` presets: fixed seeds and shapes, so a preset always gives the same weights.
# name -> (family, seed, write_tiny_checkpoint settings). The first five are the families' own names.
PRESETS = {
    "bt": ("bt", 0, {}),
    "armorm": ("armorm", 1, {}),
    "qrm": ("qrm", 2, {"shards": 2}),
    "urm": ("urm", 3, {}),
    "grm": ("grm", 4, {}),
    "qwen3": ("bt", 5, {"backbone": "qwen3"}),          # Skywork-Reward-V2-Qwen3
    "llama32": ("bt", 6, {"backbone": "llama32"}),      # Skywork-Reward-V2-Llama-3.2
    "qwen2-rm": ("qwen2_rm", 7, {}),                    # Qwen2.5-Math-RM
    "prm": ("qwen2_prm", 8, {}),                        # Qwen2.5-Math-PRM (step token <extra_0>)
}
PRESET_VERSION = 1


def tiny_checkpoint(name: str, cache_dir: str | None = None) -> str:
    """The preset tiny checkpoint `name` (PRESETS), written once into a cache directory."""
    if name not in PRESETS:
        raise ValueError(f"unknown tiny model 'tiny:{name}', expected one of "
                         + ", ".join(f"tiny:{p}" for p in PRESETS))
    family, seed, settings = PRESETS[name]
    root = cache_dir or os.environ.get("RMSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rmserve")
    tag = hashlib.sha1(f"{name}-{PRESET_VERSION}".encode()).hexdigest()[:8]
    path = os.path.join(root, "tiny", f"{name}-{tag}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path))
    write_tiny_checkpoint(tmp, family, seed=seed, **settings)
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote it first
        pass
    return path
