"""FP8 accuracy on CPU: how quantization="fp8" changes a reward model's scores and rankings,
beside bf16, both against fp32, on real preference pairs and best-of-N groups.

    nice -n 10 python bench/fp8_accuracy.py --cache /tmp/fp8.json   # the table in bench/RESULTS.md
    python bench/fp8_accuracy.py --device cuda --layers 32 --pairs 2312 --groups 805 --answer-tokens 4096

Model: a random URM-family checkpoint (its `means` are linear readouts of the last token's final
hidden state, so one forward scores several heads) with Llama-3-8B's layer shape (hidden 4096, 32 query /
8 KV heads of 128, MLP 14336, the real 128,256-token vocabulary) at reduced depth (--layers), its
weights rounded to bf16 as real checkpoints are, with the activation outliers real Llama models
have built into the weights:
- outlier features (Dettmers et al. 2022, LLM.int8()): the same 6 hidden channels of every
  RMSNorm weight before a linear are x20, so every qkv_proj / gate_up_proj input carries 6
  channels ~20x the rest, in every token;
- massive activations (Sun et al. 2024): the embeddings of <|begin_of_text|> and
  <|start_header_id|> hold +-1000x the row's RMS in 2 other fixed channels, so the residual
  stream of those tokens is dominated by 2 channels, as Llama's is at its first tokens and delimiters.
The script measures and prints both (channel max / median of the first qkv_proj input, the
massive tokens' share of their residual's energy) from the bf16 model, so the claim is checked.
Two heads read the same hidden states: `random` (a random direction: the scores differ between
samples only by what a random projection sees, the worst case for noise against signal) and
`probe` (the top principal direction of the fp32 model's last-token states on a disjoint
calibration subset: like a trained head, it reads a direction along which answers differ).

Data (../shared/data, the real Llama 3 tokenizer and chat template): a seeded random subset of
the HH-RLHF harmless test pairs (whole conversations) and of the AlpacaEval best-of-15 groups
(each answer cut to its first --answer-tokens tokens: the full groups cost ~5,000 tokens each).
Each engine (fp32, bf16, fp8 with the PyTorch references and CPU torch._scaled_mm) scores every
sample with shared prompts on. Reported: score error against fp32 (mean and max |d|, also over
the fp32 scores' std), pair agreement (share of pairs whose preferred side equals bf16's, and
fp32's), best-of-N top-1 agreement (same), and CPU seconds per engine. JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from prefix_sharing import DATA, build_checkpoint, read_jsonl_gz  # noqa: E402

from rmserve import Engine  # noqa: E402

OUTLIER_CHANNELS = (97, 788, 1384, 2298, 3071, 4062)   # any fixed channels
OUTLIER_GAIN = 20.0
MASSIVE_CHANNELS = (1415, 2533)                          # Llama-2-7B's, as Sun et al. report them
MASSIVE_GAIN = 1000.0
MASSIVE_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>")


def outlier_checkpoint(path: str, layers: int, tokenizer_dir: str) -> str:
    """The 8B-shaped random URM checkpoint with the outliers above, stored in bf16."""
    build_checkpoint(path, "urm", hidden=4096, layers=layers, heads=32, kv_heads=8, intermediate=14336,
                     tokenizer_dir=tokenizer_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    t = load_file(weights)
    for name, w in t.items():
        if name.endswith("layernorm.weight"):
            w[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    emb = t["model.embed_tokens.weight"]
    for token in MASSIVE_TOKENS:
        row = tok.convert_tokens_to_ids(token)
        rms = emb[row].pow(2).mean().sqrt()
        emb[row, list(MASSIVE_CHANNELS)] = torch.tensor([1.0, -1.0]) * MASSIVE_GAIN * rms
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}, weights, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def pairs(n: int, seed: int, skip: int = 0) -> tuple[list, list]:
    """n random pairs (seeded); skip: leave out the first `skip` of the shuffled order (calibration's)."""
    rows = list(read_jsonl_gz(os.path.join(DATA, "hh_rlhf_harmless_test.jsonl.gz")))
    rows = random.Random(seed).sample(rows, len(rows))[skip:skip + n]
    return [r[s] for r in rows for s in ("chosen", "rejected")], [r["pair_id"] for r in rows for _ in range(2)]


def groups(n: int, seed: int, answer_tokens: int, tok, skip: int = 0) -> tuple[list, list]:
    by_prompt: dict = {}
    for row in read_jsonl_gz(os.path.join(DATA, "alpaca_eval_bon.jsonl.gz")):
        by_prompt.setdefault(row["prompt_id"], []).append(row["messages"])
    chosen = random.Random(seed).sample(sorted(by_prompt), len(by_prompt))[skip:skip + n]
    convs, keys = [], []
    for pid in chosen:
        for msgs in by_prompt[pid]:
            answer = tok.decode(tok.encode(msgs[-1]["content"], add_special_tokens=False)[:answer_tokens])
            convs.append(msgs[:-1] + [{"role": "assistant", "content": answer or "."}])
            keys.append(pid)
    return convs, keys


def outlier_stats(engine: Engine, convs: list) -> dict:
    """Checks the outliers are there: the first layer's qkv_proj input (channel max / median of
    |x| per token) and the massive tokens' share of their residual energy in the 2 channels."""
    seen = {}
    layer = engine.model.backbone.layers[0]

    def keep_first_input(module, args) -> None:
        seen.setdefault("x", args[0].float())

    h = layer.self_attn.qkv_proj.register_forward_pre_hook(keep_first_input)
    engine.score(convs[:4])
    h.remove()
    x = seen["x"].abs()
    ratio = (x[:, list(OUTLIER_CHANNELS)].amax(-1) / x.median(-1).values)
    emb = engine.model.backbone.embed_tokens.weight.float()
    ids = [engine.preprocessor.tokenizer.convert_tokens_to_ids(t) for t in MASSIVE_TOKENS]
    share = (emb[ids][:, list(MASSIVE_CHANNELS)].pow(2).sum(-1) / emb[ids].pow(2).sum(-1))
    return {"qkv_input_outlier_over_median_p50": round(ratio.median().item(), 1),
            "massive_token_energy_share_min": round(share.min().item(), 4)}


HEADS = {"random": 0, "probe": 1}    # head -> URM mean index (score.weight row 2 * index)


def fit_probe(path: str, calibration: list, device: str) -> None:
    """Sets score.weight's row of the `probe` head to the top principal direction of the fp32 model's
    last-token final hidden states on `calibration` (scaled to the random row's norm)."""
    engine = Engine.from_pretrained(path, device=device, **engine_settings("fp32", device))
    caught, packed = [], engine.model.head.packed

    def catch(hidden, last_idx, gate_idx):
        caught.append(hidden[last_idx].float())
        return packed(hidden, last_idx, gate_idx)

    engine.model.head.packed = catch
    engine.score(calibration)
    h = torch.cat(caught)
    direction = torch.linalg.svd(h - h.mean(0), full_matrices=False).Vh[0]
    weights = os.path.join(path, "model.safetensors")
    t = load_file(weights)
    w = t["score.weight"].float()
    w[2 * HEADS["probe"]] = direction * w[2 * HEADS["random"]].norm()
    t["score.weight"] = w.to(torch.bfloat16)
    save_file(t, weights, metadata={"format": "pt"})


def engine_settings(name: str, device: str) -> dict:
    """fp32 on CUDA runs the reference attention eagerly (FlashAttention and CUDA graphs are bf16-only)."""
    cuda32 = {"attention": "reference", "enforce_eager": True} if device == "cuda" else {}
    return {"bf16": {"dtype": "bfloat16"}, "fp8": {"dtype": "bfloat16", "quantization": "fp8"},
            "fp32": {"dtype": "float32", **cuda32}}[name]


def run(path: str, sets: dict, settings: dict, device: str) -> tuple[dict, float, dict, dict]:
    """-> ({head: {set: scores}}, CPU seconds, outlier stats (bf16 only), {set: tokens})."""
    engine = Engine.from_pretrained(path, device=device, **settings)
    stats = outlier_stats(engine, sets["pairs"][0]) if settings.get("quantization") is None and \
        settings["dtype"] == "bfloat16" else {}
    tokens = {name: sum(len(e) for e in engine.encode(convs)) for name, (convs, _) in sets.items()}
    t0 = time.process_time()
    results = {name: engine.score(convs, groups=keys) for name, (convs, keys) in sets.items()}
    seconds = time.process_time() - t0
    assert not any(r.error for rs in results.values() for r in rs)
    scores = {head: {name: [r.means[i] for r in rs] for name, rs in results.items()} for head, i in HEADS.items()}
    return scores, seconds, stats, tokens


def pair_agreement(a: list, b: list) -> float:
    same = [(a[i] > a[i + 1]) == (b[i] > b[i + 1]) for i in range(0, len(a), 2)]
    return sum(same) / len(same)


def top1_agreement(a: list, b: list, keys: list) -> float:
    best_a, best_b = {}, {}
    for i, k in enumerate(keys):
        if k not in best_a or a[i] > a[best_a[k]]:
            best_a[k] = i
        if k not in best_b or b[i] > b[best_b[k]]:
            best_b[k] = i
    return sum(best_a[k] == best_b[k] for k in best_a) / len(best_a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the 8B-shaped model")
    ap.add_argument("--pairs", type=int, default=200, help="HH-RLHF pairs (random, seeded)")
    ap.add_argument("--groups", type=int, default=40, help="AlpacaEval best-of-15 groups (random, seeded)")
    ap.add_argument("--answer-tokens", type=int, default=24, help="AlpacaEval answers cut to this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the same measurement at full depth on a GPU")
    ap.add_argument("--tokenizer", default=os.path.join(DATA, "llama3-tokenizer"))
    ap.add_argument("--no-fp32", action="store_true", help="bf16 and fp8 only (errors against bf16)")
    ap.add_argument("--cache", default=None, help="keep each engine's scores here; a rerun resumes from it")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "fp8_accuracy.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    calibration = (16, 2)   # pairs, groups fitted for the probe head; left out of the measured sets
    with tempfile.TemporaryDirectory() as tmp:
        path = outlier_checkpoint(os.path.join(tmp, "rm"), args.layers, args.tokenizer)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        fit_probe(path, pairs(calibration[0], args.seed)[0] +
                  groups(calibration[1], args.seed, args.answer_tokens, tok)[0], args.device)
        sets = {"pairs": pairs(args.pairs, args.seed, skip=calibration[0]),
                "groups": groups(args.groups, args.seed, args.answer_tokens, tok, skip=calibration[1])}
        # bf16 and fp8 first: on a busy machine the headline (agreement with bf16) lands first. Each
        # engine's scores are kept in --cache as it finishes; a rerun with the same settings reuses them.
        names = ("bf16", "fp8") if args.no_fp32 else ("bf16", "fp8", "fp32")
        engines = {name: engine_settings(name, args.device) for name in names}
        key = {k: v for k, v in vars(args).items() if k not in ("json", "cache", "device", "no_fp32")}
        key = json.dumps(key if args.device == "cpu" else {**key, "device": args.device}, sort_keys=True)
        cache = {}
        if args.cache and os.path.exists(args.cache):
            with open(args.cache) as f:
                cache = json.load(f)
            cache = cache if cache.get("key") == key else {}
        cache["key"] = key
        scores, cpu, stats = {}, {}, {}
        for name, settings in engines.items():
            if name in cache:
                scores[name], cpu[name], tokens = cache[name]["scores"], cache[name]["cpu_s"], cache[name]["tokens"]
                stats.update(cache[name]["stats"])
                continue
            scores[name], cpu[name], s, tokens = run(path, sets, settings, args.device)
            stats.update(s)
            print(f"{name}: {cpu[name]:.0f} CPU-s", file=sys.stderr, flush=True)
            if args.cache:
                cache[name] = {"scores": scores[name], "cpu_s": cpu[name], "tokens": tokens, "stats": s}
                with open(args.cache, "w") as f:
                    json.dump(cache, f)

    rows, reference = [], "bf16" if args.no_fp32 else "fp32"   # the score errors' reference
    for head in HEADS:
        sc = {name: scores[name][head] for name in engines}
        ref = torch.tensor(sc[reference]["pairs"] + sc[reference]["groups"], dtype=torch.float64)
        with_fp32 = "fp32" in sc
        margins = torch.tensor(sc["bf16"]["pairs"][0::2]) - torch.tensor(sc["bf16"]["pairs"][1::2])
        for name in ("bf16", "fp8"):
            got = torch.tensor(sc[name]["pairs"] + sc[name]["groups"], dtype=torch.float64)
            err = (got - ref).abs()
            rows.append({
                "head": head, "engine": name, "score_err_mean": err.mean().item(), "score_err_max": err.max().item(),
                "reference": reference, "score_std_reference": ref.std().item(), "score_err_mean_over_std": (err.mean() / ref.std()).item(),
                "median_abs_pair_margin_bf16": margins.abs().median().item(),
                "pair_agree_bf16": pair_agreement(sc[name]["pairs"], sc["bf16"]["pairs"]),
                "pair_agree_fp32": pair_agreement(sc[name]["pairs"], sc["fp32"]["pairs"]) if with_fp32 else None,
                "top1_agree_bf16": top1_agreement(sc[name]["groups"], sc["bf16"]["groups"], sets["groups"][1]),
                "top1_agree_fp32": (top1_agreement(sc[name]["groups"], sc["fp32"]["groups"], sets["groups"][1])
                                    if with_fp32 else None),
                "cpu_s": cpu[name]})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"commit": commit, "torch": torch.__version__, "device": args.device, "layers": args.layers, "hidden": 4096, "intermediate": 14336,
            "pairs": args.pairs, "groups": args.groups, "answer_tokens": args.answer_tokens, "seed": args.seed,
            "calibration_pairs_groups": calibration, "tokens": tokens, "cpu_s": cpu, **stats}
    print(f"model: 8B layer shape x {args.layers} layer(s), outlier features x{OUTLIER_GAIN:g} (6 channels), massive "
          f"activations x{MASSIVE_GAIN:g} (2 channels); {args.pairs} HH pairs ({tokens['pairs']} tokens), "
          f"{args.groups} AlpacaEval groups of 15 ({tokens['groups']} tokens, answers cut to {args.answer_tokens})")
    print(f"measured outliers: {stats}; CPU seconds {({k: round(v) for k, v in cpu.items()})}")
    pct = lambda v, digits: "-" if v is None else f"{v:.{digits}%}"   # noqa: E731
    print(f"| head | engine | mean abs score err vs {reference} (/ score std) | max | pair agreement with bf16 | with fp32 | "
          "best-of-15 top-1 agreement with bf16 | with fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head']} | {r['engine']} | {r['score_err_mean']:.4f} ({r['score_err_mean_over_std']:.1%}) | "
              f"{r['score_err_max']:.4f} | {r['pair_agree_bf16']:.2%} | {pct(r['pair_agree_fp32'], 2)} | "
              f"{r['top1_agree_bf16']:.1%} | {pct(r['top1_agree_fp32'], 1)} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
