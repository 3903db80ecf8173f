"""Tiny random-weight checkpoints of every family, in the real on-disk format.

config.json with the family's `architectures` and keys, safetensors with the real tensor names
(optionally sharded with model.safetensors.index.json), and a byte-level BPE tokenizer with the
real Llama 3 special-token strings and a Llama-3-style chat template. Scores from these are
meaningless; they exist for tests, smoke runs and `--model tiny:<family>`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors.torch import save_file

from .config import FAMILIES

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PAD_TOKEN = "[PAD]"

# The Llama 3 template (BOS inside, as ArmoRM/FsfairX/GRM ship it) and the same without BOS
# (as Skywork-Reward and URM ship it: the tokenizer adds BOS).
TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "llama3_nobos": (
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}

# The Llama 3 tokenizer's pre-tokenizer split (its "\n\n" after a header is one piece).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Words whose byte-level merges the tiny tokenizer learns (so common words are one token).
_WORDS = ("assistant", "user", "system", " the", " and", " you", " is", " to", " of", " a", " in", " that",
          " it", " for", " with", " are", " can", " what", " how", " this", " be", " on", " not", " your",
          " have", " do", " as", " or", " I", " my", "Hello", " Hi", " please", " answer", " question")

ARCHITECTURES = {
    "bt": "LlamaForSequenceClassification",
    "armorm": "LlamaForRewardModelWithGating",
    "qrm": "LlamaForRewardModelWithGating",
    "urm": "LlamaForSequenceClassificationWithNormal_Weights",
    "grm": "LlamaForCausalLM",
}
# Per family, as the published checkpoints are: backbone generation and template style.
FAMILY_DEFAULTS = {
    "bt": {"llama31": True, "template": "llama3_nobos"},     # Skywork-Reward-Llama-3.1
    "armorm": {"llama31": False, "template": "llama3"},      # ArmoRM-Llama3-8B
    "qrm": {"llama31": True, "template": "llama3"},          # QRM-Llama3.1-8B
    "urm": {"llama31": True, "template": "llama3_nobos"},    # URM-LLaMa-3.1-8B
    "grm": {"llama31": False, "template": "llama3"},         # GRM-llama3-8B-sftreg
}


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer(path: str, template: str = "llama3") -> int:
    """Writes tokenizer.json and tokenizer_config.json; returns the vocabulary size including [PAD]."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

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
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + [PAD_TOKEN])
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": PAD_TOKEN,
        "chat_template": TEMPLATES[template],
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return tok.get_vocab_size()


def _config(family: str, vocab: int, pad_id: int, bos_id: int, eos_id: int, *, hidden: int, layers: int,
            heads: int, kv_heads: int, intermediate: int, llama31: bool, style: str, dtype: str,
            max_position_embeddings: int | None, head: dict) -> dict:
    rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192} if llama31 else None)
    cfg = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "head_dim": hidden // heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": max_position_embeddings or (131072 if llama31 else 8192),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }
    if style == "transformers4":   # what the published checkpoints carry
        cfg.update({"rope_theta": 500000.0, "rope_scaling": rope, "torch_dtype": dtype})
    else:                           # what transformers 5 writes
        cfg.update({"rope_parameters": dict(rope or {"rope_type": "default"}, rope_theta=500000.0), "dtype": dtype})
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
    return cfg


def _head_shapes(family: str, hidden: int, head: dict) -> dict[str, tuple[int, ...]]:
    if family == "bt":
        return {"score.weight": (head["num_labels"], hidden)}
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
                          llama31: bool | None = None, template: str | None = None,
                          config_style: str = "transformers4", shards: int = 1,
                          dtype: torch.dtype = torch.float32, max_position_embeddings: int | None = None,
                          **head_overrides) -> str:
    """Writes a random checkpoint of `family` to `path` (created) and returns `path`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}', expected one of {FAMILIES}")
    defaults = FAMILY_DEFAULTS[family]
    llama31 = defaults["llama31"] if llama31 is None else llama31
    head = {"num_labels": 10 if family == "urm" else 1, "num_objectives": 19, "num_quantiles": 19,
            "gating_temperature": 5.0 if family == "qrm" else 10.0, "gating_hidden_dim": 32,
            "gating_n_hidden": 3, "vhead_layer_type": "mlp", "vhead_num_layers": 1, "vhead_num_neurons": 32,
            "store_transform": True}
    unknown = set(head_overrides) - set(head)
    if unknown:
        raise TypeError(f"unknown head settings {sorted(unknown)}")
    head.update(head_overrides)
    os.makedirs(path, exist_ok=True)
    vocab = write_tokenizer(path, template or defaults["template"])
    pad_id, bos_id, eos_id = vocab - 1, vocab - 1 - len(SPECIAL_TOKENS), vocab - 2
    dtype_name = str(dtype).replace("torch.", "")
    cfg = _config(family, vocab, pad_id, bos_id, eos_id, hidden=hidden, layers=layers, heads=heads,
                  kv_heads=kv_heads, intermediate=intermediate, llama31=llama31, style=config_style,
                  dtype=dtype_name, max_position_embeddings=max_position_embeddings, head=head)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)

    hd = hidden // heads
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


# `--model tiny:<family>` presets: fixed seeds and shapes, so a preset always gives the same weights.
PRESET_VERSION = 1


def tiny_checkpoint(family: str, cache_dir: str | None = None) -> str:
    """The preset tiny checkpoint of `family`, written once into a cache directory."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model 'tiny:{family}', expected one of "
                         + ", ".join(f"tiny:{f}" for f in FAMILIES))
    root = cache_dir or os.environ.get("RMSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rmserve")
    tag = hashlib.sha1(f"{family}-{PRESET_VERSION}".encode()).hexdigest()[:8]
    path = os.path.join(root, "tiny", f"{family}-{tag}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path))
    write_tiny_checkpoint(tmp, family, seed=FAMILIES.index(family), shards=2 if family == "qrm" else 1)
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote it first
        pass
    return path
