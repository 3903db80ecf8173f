"""Write a random-weight checkpoint of a real shape in the Hugging Face on-disk format, with a real
tokenizer: what `rmserve score --model DIR` loads in the lease's offline stage.

    python bench/write_checkpoint.py /tmp/armorm-8b --family armorm --shape 8b --layers 8 \
        --dtype bfloat16 --tokenizer ../shared/data/llama3-tokenizer --shards 4

config.json from rmserve's shape table (bench/rmbench.py: llama_config; vocabulary 128,256),
safetensors with the Hugging Face tensor names (q/k/v and gate/up split back out of rmserve's
fused matrices), sharded with an index when --shards > 1, and the tokenizer's tokenizer.json and
tokenizer_config.json (chat template) copied beside them. The weights are random (rmbench's
initialisation): the work is real, the scores meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

import torch
from safetensors.torch import save_file

import rmbench
from rmserve.loader import PACKED

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names: the loader's PACKED table inverted
    (rmserve's fused qkv_proj / gate_up_proj split back into q/k/v and gate/up)."""
    spec = model.spec
    parts: dict[str, list[str]] = {}                 # fused name -> its HF parts, in shard order
    for hf_name, (name, _) in sorted(PACKED.items(), key=lambda kv: kv[1]):
        parts.setdefault(name, []).append(hf_name)
    sizes = {"self_attn.qkv_proj": [spec.q_size, spec.kv_size, spec.kv_size],
             "mlp.gate_up_proj": [spec.intermediate_size] * 2}
    out = {}
    for name, t in model.backbone.state_dict().items():
        m = re.fullmatch(r"(layers\.\d+)\.(.+)\.weight", name)
        if m and m.group(2) in parts:
            for hf_name, piece in zip(parts[m.group(2)], t.split(sizes[m.group(2)])):
                out[f"model.{m.group(1)}.{hf_name}.weight"] = piece.contiguous()
        else:
            out[f"model.{name}"] = t.contiguous()
    out.update((name, t.contiguous()) for name, t in model.head.state_dict().items())
    return out


def save(path: str, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--family", default="armorm")
    ap.add_argument("--shape", choices=sorted(rmbench.SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokenizer", default=rmbench.TOKENIZER,
                    help="a folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random weights are drawn (a GPU draws 8B in seconds)")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.tokenizer, "tokenizer.json")):
        ap.error(f"no tokenizer.json in {args.tokenizer}")
    start = time.perf_counter()
    cfg = rmbench.llama_config(args.shape, args.family, args.layers)
    model = rmbench.random_model(cfg, args.device, getattr(torch, args.dtype))
    tensors = {k: v.cpu() for k, v in hf_tensors(model).items()}
    del model
    os.makedirs(args.path, exist_ok=True)
    with open(os.path.join(args.path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**cfg, "torch_dtype": args.dtype}, f, indent=1)
    save(args.path, tensors, args.shards)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(args.tokenizer, name)):
            shutil.copy(os.path.join(args.tokenizer, name), args.path)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{args.path}: {args.family}, shape {args.shape}, {cfg['num_hidden_layers']} layers, {args.dtype}, "
          f"{size / 2**30:.2f} GiB in {args.shards} shard(s), tokenizer from {args.tokenizer}, "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
