"""Checkpoint loading: a Hugging Face directory (or hub id) -> spec, backbone and head.

Strict: every tensor the model needs must be in the checkpoint with the right shape, and every
tensor in the checkpoint must be used or be listed in IGNORED with the reason. Tensors are
read one at a time straight to the target device and dtype; no transformers model is built.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from .config import ModelSpec, load_spec
from .heads import build_head, head_param_dtype
from .model.decoder import Backbone
from .model.rope import inv_freq

# HF module (the part after "model.layers.{i}.") -> (fused module, shard index). Its weight and, where the
# backbone has them (Qwen2's q/k/v), its bias go to the fused module's weight / bias rows of that shard.
PACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}

# Checkpoint tensors that scoring does not use, and why.
IGNORED = {
    r"lm_head\.weight": "language-model head (GRM-sftreg carries one; tied-embedding models have none); scoring "
                        "reads hidden states only",
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": "RoPE buffer saved by old transformers; recomputed from config",
    r".*\.num_batches_tracked": "BatchNorm training counter; inference uses the running statistics only",
}


class CheckpointError(ValueError):
    """The checkpoint's files do not match what its config.json promises."""


@dataclass
class LoadedModel:
    spec: ModelSpec
    backbone: Backbone
    head: nn.Module
    path: str
    # (attention backend, kernels) of the Engine(s) running it: the layers hold one choice, so
    # engines on one loaded model must agree (engine.py checks)
    runs_with: tuple[str, str, str | None] | None = None
    quantization: str | None = None      # "fp8": the backbone was quantized at load (model/fp8.py)


def resolve(model: str) -> str:
    """A local directory, or a hub id downloaded (config, safetensors, tokenizer files only)."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise CheckpointError(f"{model} is a file; pass the checkpoint directory")
    if model.startswith(("/", "./", "../", "~")):
        raise CheckpointError(f"no checkpoint directory at {model}")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise CheckpointError(f"{model} is neither a local directory nor a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:  # offline, gated, or missing: say which model and why
        raise CheckpointError(f"could not fetch '{model}' from the hub ({type(e).__name__}: {e}); "
                              "pass a local checkpoint directory instead") from e


def safetensors_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.exists(os.path.join(model_dir, n))]
        if missing:
            raise CheckpointError(f"shards listed in model.safetensors.index.json are missing: {missing}")
        return [os.path.join(model_dir, n) for n in names]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        return [single]
    pickles = [n for n in os.listdir(model_dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}); rmserve loads safetensors "
            "only, since unpickling can run code. Convert them once with safetensors' conversion tools.")
    raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _materialize(module: nn.Module, device: torch.device, dtype_of) -> None:
    """Replace meta parameters/buffers by empty tensors on `device` with dtype_of(name, tensor)."""
    for mod_name, mod in module.named_modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(mod, kind)
            for name, t in list(table.items()):
                if t is None:
                    continue
                full = f"{mod_name}.{name}" if mod_name else name
                new = torch.empty(t.shape, dtype=dtype_of(full, t), device=device)
                table[name] = nn.Parameter(new, requires_grad=False) if kind == "_parameters" else new


def _ignored(name: str) -> bool:
    return any(re.fullmatch(p, name) for p in IGNORED)


def _target(name: str) -> tuple[str, str, int | None] | None:
    """HF tensor name -> (module 'backbone'|'head', parameter name, shard index or None)."""
    if _ignored(name):
        return None
    if name.startswith("model."):
        inner = name[len("model."):]
        m = re.fullmatch(r"(layers\.\d+\.)(.+)\.(weight|bias)", inner)
        if m and m.group(2) in PACKED:
            fused, shard = PACKED[m.group(2)]
            return "backbone", f"{m.group(1)}{fused}.{m.group(3)}", shard
        return "backbone", inner, None
    return "head", name, None


def _hf_names(where: str, pname: str, shards: set[int] | None) -> list[str]:
    """Checkpoint names of a model parameter (the unfilled shards of a fused one)."""
    if where == "head":
        return [pname]
    m = re.fullmatch(r"(layers\.\d+\.)(.+)\.(weight|bias)", pname)
    if shards is None or m is None:
        return ["model." + pname]
    unfused = {v: k for k, v in PACKED.items()}
    return [f"model.{m.group(1)}{unfused[(m.group(2), s)]}.{m.group(3)}" for s in sorted(shards)]


def _shard_slices(param_name: str, spec: ModelSpec) -> list[tuple[int, int]]:
    if "qkv_proj" in param_name:
        q, kv = spec.q_size, spec.kv_size
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    i = spec.intermediate_size
    return [(0, i), (i, 2 * i)]


def load_model(model_dir: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               quantization: str | None = None) -> LoadedModel:
    """quantization: None, or "fp8" to quantize the backbone's linears once loaded (model/fp8.py)."""
    device = torch.device(device)
    spec = load_spec(model_dir)
    files = safetensors_files(model_dir)
    with torch.device("meta"):
        backbone = Backbone(spec)
        head = build_head(spec)
    _materialize(backbone, device, lambda n, t: dtype)
    _materialize(head, device, lambda n, t: t.dtype if not t.is_floating_point() else
                 head_param_dtype(spec.family, n, dtype))
    backbone.inv_freq = inv_freq(spec.rope, spec.head_dim).to(device)
    modules = {"backbone": dict(backbone.named_parameters()), "head": dict(head.named_parameters())}
    modules["backbone"].update((n, b) for n, b in backbone.named_buffers() if n != "inv_freq")
    modules["head"].update((n, b) for n, b in head.named_buffers() if not _ignored(n))
    pending = {(m, n): None for m, table in modules.items() for n in table}
    for (m, n) in list(pending):
        if "qkv_proj" in n or "gate_up_proj" in n:
            pending[(m, n)] = set(range(len(_shard_slices(n, spec))))

    seen: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in seen:
                    raise CheckpointError(f"tensor '{name}' appears in more than one shard")
                seen.add(name)
                target = _target(name)
                if target is None:
                    continue
                where, pname, shard = target
                param = modules[where].get(pname)
                if param is None:
                    raise CheckpointError(
                        f"unexpected tensor '{name}' for a {spec.family} model ({spec.architecture}); "
                        "it is neither used nor listed as ignorable")
                dest = param.data
                if shard is not None:
                    lo, hi = _shard_slices(pname, spec)[shard]
                    dest = dest[lo:hi]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(dest.shape):
                    raise CheckpointError(f"tensor '{name}' has shape {list(shape)}, expected {list(dest.shape)}")
                dest.copy_(f.get_tensor(name))
                if shard is None:
                    pending.pop((where, pname))
                else:
                    pending[(where, pname)].discard(shard)
                    if not pending[(where, pname)]:
                        pending.pop((where, pname))

    optional = getattr(head, "optional", {})
    for (where, pname) in list(pending):
        if where == "head" and pname in optional:
            modules["head"][pname].data.copy_(head.default_tensor(pname))
            pending.pop((where, pname))
    if pending:
        names = sorted(n for (w, p), shards in pending.items() for n in _hf_names(w, p, shards))
        raise CheckpointError(f"checkpoint is missing {len(names)} tensor(s) a {spec.family} model needs, "
                              f"e.g. {names[:5]}")
    if quantization is not None:
        from .model.fp8 import quantize_backbone

        quantize_backbone(backbone, quantization)
    backbone.eval()
    head.eval()
    return LoadedModel(spec=spec, backbone=backbone, head=head, path=model_dir, quantization=quantization)
