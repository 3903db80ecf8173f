"""FP8 accuracy on CPU: how quantization="fp8" changes a reward model's scores and rankings,
beside bf16, both against fp32, on real preference pairs and best-of-N groups.

    nice -n 10 python bench/fp8_accuracy.py --cache /tmp/fp8.json   # 1 layer, 200 pairs, 40 groups
    python bench/fp8_accuracy.py --device cuda --layers 32 --pairs 2312 --groups 805 --answer-tokens 4096
    # the study in bench/RESULTS.md (per-GEMM ablation; depth 2 and 4), 100 pairs, no groups:
    nice -n 10 python bench/fp8_accuracy.py --layers 1 --pairs 100 --groups 0 --engines fp8,ablation,fp32
    nice -n 10 python bench/fp8_accuracy.py --layers 4 --pairs 100 --groups 0 --engines bf16,fp8,fp32
    # the same without the built-in outliers
    nice -n 10 python bench/fp8_accuracy.py --layers 1 --pairs 100 --groups 0 --engines fp8,fp32 --outliers none

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
--outliers builds in both (the default), one, or none of them. The script measures and prints both
(channel max / median of the first qkv_proj input, the massive tokens' share of their residual's
energy) from the bf16 model, so the claim is checked.
Two heads read the same hidden states: `random` (a random direction: the scores differ between
samples only by what a random projection sees, the worst case for noise against signal) and
`probe` (the top principal direction of the fp32 model's last-token states on a disjoint
calibration subset: like a trained head, it reads a direction along which answers differ).

Data (../shared/data, the real Llama 3 tokenizer and chat template): a seeded random subset of
the HH-RLHF harmless test pairs (whole conversations) and of the AlpacaEval best-of-15 groups
(each answer cut to its first --answer-tokens tokens: the full groups cost ~5,000 tokens each).
Engines (--engines): bf16 (always: the reference), fp32, fp8 (quantization="fp8", the PyTorch
references and CPU torch._scaled_mm), and for the ablation fp8:<gemms>, only those of qkv, o,
gate_up, down in FP8 (model/fp8.py: quantize_backbone's `linears`; `ablation` runs each alone and
all but each). Each scores every sample with shared prompts on. Reported against bf16 and fp32:
score error (mean, max, std over the reference's std), pair agreement (share of pairs whose
preferred side is the reference's; pairs the reference ties, bf16-rounded scores being equal, are
left out) with its 95% Wilson interval, the pair-margin error's std, the agreement that error
predicts (below), best-of-N top-1 agreement, and CPU seconds per engine. JSON to --json.

Counting flips is noisy (200 pairs at 95% agreement: a standard error of 1.5 points). The margin error (engine's
chosen-minus-rejected margin minus the reference's) is measured on every pair: with it ~N(0, s),
pair i flips with probability Phi(-|m_i| / s), so the expected agreement is 1 - mean_i Phi(-|m_i| / s)
(bootstrap interval over pairs). What transfers to another model is r = s / std(m), the margin error
over the margins' spread: were the margins ~N(0, std(m)) too, a pair flips with probability
arctan(r) / pi, so the agreement is 1 - arctan(r / k) / pi for a model whose margins are k times larger
against the same error (k = 1, 3, 10 printed: a prediction, not a measurement), and 99.5% needs
k >= r / tan(0.005 pi) = r / 0.0157 (printed as "margins needed"). (Scaling the measured margins
instead is ruled by the one or two near-tied pairs of 100, which flip about half the time while
k |m| << s.) The GEMMs' errors add in variance, so the ablation reports each engine's share of the
full FP8 margin-error variance (paired on the same pairs: far less noisy than either agreement).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
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
from rmserve.engine import EngineConfig, load_tokenizer  # noqa: E402
from rmserve.loader import load_model  # noqa: E402
from rmserve.model.fp8 import QUANTIZED, quantize_backbone  # noqa: E402

OUTLIER_CHANNELS = (97, 788, 1384, 2298, 3071, 4062)   # any fixed channels
OUTLIER_GAIN = 20.0
MASSIVE_CHANNELS = (1415, 2533)                          # Llama-2-7B's, as Sun et al. report them
MASSIVE_GAIN = 1000.0
MASSIVE_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>")


OUTLIERS = ("both", "features", "massive", "none")   # --outliers: which of the two are built in


def outlier_checkpoint(path: str, layers: int, tokenizer_dir: str, outliers: str = "both") -> str:
    """The 8B-shaped random URM checkpoint with the outliers above (`outliers`: both, one, none), stored in bf16."""
    build_checkpoint(path, "urm", hidden=4096, layers=layers, heads=32, kv_heads=8, intermediate=14336,
                     tokenizer_dir=tokenizer_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    weights = os.path.join(path, "model.safetensors")
    t = load_file(weights)
    for name, w in t.items():
        if name.endswith("layernorm.weight") and outliers in ("both", "features"):
            w[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN
    emb = t["model.embed_tokens.weight"]
    for token in MASSIVE_TOKENS if outliers in ("both", "massive") else ():
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


def fit_probe(path: str, calibration: list, device: str) -> str:
    """Sets score.weight's row of the `probe` head to the top principal direction of the fp32 model's
    last-token final hidden states on `calibration` (scaled to the random row's norm). Returns a hash
    of the head's weights (cached scores are reused only for the same heads)."""
    engine = Engine.from_pretrained(path, device=device, **engine_settings("fp32", device))
    caught, packed = [], engine.model.head.packed

    def catch(hidden, last_idx, *rest):   # rest: gate_idx, step_idx (heads/fused.py: packed)
        caught.append(hidden[last_idx].float())
        return packed(hidden, last_idx, *rest)

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
    return hashlib.sha256(t["score.weight"].view(torch.int16).numpy().tobytes()).hexdigest()[:16]


# The per-GEMM ablation: an engine "fp8:<gemms>" quantizes only those GEMMs ('+'-joined short names),
# the others stay bf16 (model/fp8.py: quantize_backbone's `linears`); "fp8" is the engine's own, all four.
GEMMS = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
assert set(GEMMS.values()) == set(QUANTIZED)
ABLATION = tuple(f"fp8:{g}" for g in GEMMS) + tuple("fp8:" + "+".join(h for h in GEMMS if h != g) for g in GEMMS)


def engine_settings(name: str, device: str) -> dict:
    """fp32 on CUDA runs the reference attention eagerly (FlashAttention and CUDA graphs are bf16-only)."""
    cuda32 = {"attention": "reference", "enforce_eager": True} if device == "cuda" else {}
    return {"bf16": {"dtype": "bfloat16"}, "fp8": {"dtype": "bfloat16", "quantization": "fp8"},
            "fp32": {"dtype": "float32", **cuda32}}[name.split(":")[0]]


def make_engine(path: str, name: str, device: str) -> Engine:
    """bf16, fp32, fp8 (Engine.from_pretrained, as a user gets them) or fp8:<gemms> (the ablation)."""
    if not name.startswith("fp8:"):
        return Engine.from_pretrained(path, device=device, **engine_settings(name, device))
    model = load_model(path, device=torch.device(device), dtype=torch.bfloat16)
    quantize_backbone(model.backbone, "fp8", linears=[GEMMS[g] for g in name[4:].split("+")])
    model.quantization = "fp8"
    return Engine(model, load_tokenizer(path), EngineConfig(device=device, **engine_settings("fp8", device)))


def engine_names(spec: str) -> list[str]:
    """--engines -> the engines to run, bf16 first."""
    names = ["bf16"]
    for item in spec.split(","):
        for name in ABLATION if item == "ablation" else (item,):
            gemms = name[4:].split("+") if name.startswith("fp8:") else []
            if name not in ("bf16", "fp8", "fp32") and not (gemms and set(gemms) <= set(GEMMS)):
                raise ValueError(f"unknown engine {name!r} in --engines")
            names += [] if name in names else [name]
    return names


def run(path: str, sets: dict, name: str, device: str) -> tuple[dict, float, dict, dict]:
    """-> ({head: {set: scores}}, CPU seconds, outlier stats (bf16 only), {set: tokens})."""
    engine = make_engine(path, name, device)
    stats = outlier_stats(engine, sets["pairs"][0]) if name == "bf16" else {}
    tokens = {s: sum(len(e) for e in engine.encode(convs)) for s, (convs, _) in sets.items()}
    t0 = time.process_time()
    results = {s: engine.score(convs, groups=keys) if convs else [] for s, (convs, keys) in sets.items()}
    seconds = time.process_time() - t0
    assert not any(r.error for rs in results.values() for r in rs)
    scores = {head: {s: [r.means[i] for r in rs] for s, rs in results.items()} for head, i in HEADS.items()}
    return scores, seconds, stats, tokens


def top1_agreement(a: list, b: list, keys: list) -> float | None:
    best_a, best_b = {}, {}
    for i, k in enumerate(keys):
        if k not in best_a or a[i] > a[best_a[k]]:
            best_a[k] = i
        if k not in best_b or b[i] > b[best_b[k]]:
            best_b[k] = i
    return sum(best_a[k] == best_b[k] for k in best_a) / len(best_a) if best_a else None


# Agreement with less noise than counting flips. An engine's pair margin (chosen - rejected) is the
# reference's plus an error; with that error ~ N(0, sigma), sigma its std over the pairs, the pair i
# flips with probability Phi(-|m_i| / sigma), m_i the reference margin. The expected agreement
# 1 - mean_i Phi(-|m_i| / sigma) uses every pair's error, not only the few that flip; its interval
# is a bootstrap over the pairs (sigma and the margins resampled together). The Gaussian-margin
# model (docstring) turns r = sigma / std(m) into the agreement at margins MARGIN_SCALES times larger,
# and into the margin scale at which it reaches TARGET.
TARGET = 0.995
MARGIN_SCALES = (1, 3, 10)
NORMAL = torch.distributions.Normal(0.0, 1.0)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% binomial interval of k successes in n (Wilson score)."""
    c, h = (k + z * z / 2) / (n + z * z), z * (k * (n - k) / n + z * z / 4) ** 0.5 / (n + z * z)
    return c - h, c + h


def expected_agreement(margins: torch.Tensor, sigma: float) -> float:
    return 1 - NORMAL.cdf(-margins.abs() / sigma).mean().item()


def margin_stats(got: list, ref: list, boot: int = 1000) -> dict:
    """Pair margins of `got` against `ref` (pairs the reference ties left out): flips counted (Wilson
    interval), the margin error's std, the expected agreement (bootstrap interval), and the Gaussian-
    margin model's agreement at margins MARGIN_SCALES times larger and margin scale for TARGET."""
    a, b = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    m_got, m_ref = a[0::2] - a[1::2], b[0::2] - b[1::2]
    ties = int((m_ref == 0).sum())   # bf16-rounded scores can tie: no preferred side to keep, left out
    m_got, m_ref = m_got[m_ref != 0], m_ref[m_ref != 0]
    n, err = len(m_ref), m_got - m_ref
    same = int(((m_got > 0) == (m_ref > 0)).sum())
    sigma = err.std().item()
    r = sigma / m_ref.std().item()
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(boot):
        i = torch.randint(n, (n,), generator=g)
        draws.append(expected_agreement(m_ref[i], err[i].std().item()))
    draws = torch.tensor(draws)
    return {"pairs": n, "ties_left_out": ties, "agree": same / n, "agree_ci95": wilson(same, n),
            "margin_err_std": sigma, "margin_err_over_margin_std": r,
            "expected_agree": expected_agreement(m_ref, sigma),
            "expected_agree_ci95": (draws.quantile(0.025).item(), draws.quantile(0.975).item()),
            "gaussian_agree_at_margins_x": {k: 1 - math.atan(r / k) / math.pi for k in MARGIN_SCALES},
            "margins_needed_for_target": r / math.tan(math.pi * (1 - TARGET))}


def compare(sc: dict, name: str, keys: list) -> dict:
    """One engine's row for one head: scores {engine: {set: list}}; against bf16, and fp32 where run."""
    row = {"engine": name}
    for ref in ("bf16", "fp32"):
        if ref not in sc or ref == name:
            continue
        got = torch.tensor(sc[name]["pairs"] + sc[name]["groups"], dtype=torch.float64)
        want = torch.tensor(sc[ref]["pairs"] + sc[ref]["groups"], dtype=torch.float64)
        err = got - want
        row[ref] = {"score_err_mean": err.abs().mean().item(), "score_err_max": err.abs().max().item(),
                    "score_std": want.std().item(), "score_err_std_over_std": (err.std() / want.std()).item(),
                    **margin_stats(sc[name]["pairs"], sc[ref]["pairs"]),
                    "top1_agree": top1_agreement(sc[name]["groups"], sc[ref]["groups"], keys)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the 8B-shaped model")
    ap.add_argument("--pairs", type=int, default=200, help="HH-RLHF pairs (random, seeded)")
    ap.add_argument("--groups", type=int, default=40, help="AlpacaEval best-of-15 groups (random, seeded; 0: none)")
    ap.add_argument("--answer-tokens", type=int, default=24, help="AlpacaEval answers cut to this many tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the same measurement at full depth on a GPU")
    ap.add_argument("--tokenizer", default=os.path.join(DATA, "llama3-tokenizer"))
    ap.add_argument("--outliers", choices=OUTLIERS, default="both",
                    help="which outliers the checkpoint carries: outlier features, massive activations, both, none")
    ap.add_argument("--engines", default="bf16,fp8,fp32",
                    help="comma-separated: bf16 (always run: the reference), fp8, fp32, fp8:<gemms> ('+'-joined "
                         f"of {', '.join(GEMMS)}: only those quantized), or 'ablation' for {len(ABLATION)} of them "
                         "(each GEMM alone, and all but each)")
    ap.add_argument("--cache", default=None, help="keep each engine's scores here; a rerun resumes from it")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "fp8_accuracy.json"))
    args = ap.parse_args()
    try:
        names = engine_names(args.engines)
    except ValueError as e:
        ap.error(str(e))
    torch.manual_seed(args.seed)

    calibration = (16, 2)   # pairs, groups fitted for the probe head; left out of the measured sets
    with tempfile.TemporaryDirectory() as tmp:
        path = outlier_checkpoint(os.path.join(tmp, "rm"), args.layers, args.tokenizer, args.outliers)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        heads = fit_probe(path, pairs(calibration[0], args.seed)[0] +
                  groups(calibration[1], args.seed, args.answer_tokens, tok)[0], args.device)
        sets = {"pairs": pairs(args.pairs, args.seed, skip=calibration[0]),
                "groups": groups(args.groups, args.seed, args.answer_tokens, tok, skip=calibration[1])}
        # bf16 first, then in the order asked: on a busy machine the headline (agreement with bf16) lands
        # first. Each engine's scores are kept in --cache as it finishes; a rerun with the same data and
        # model reuses them (whatever --engines it asks for).
        key = {k: v for k, v in vars(args).items() if k not in ("json", "cache", "device", "engines")}
        key["tokenizer"] = os.path.realpath(args.tokenizer)
        key = json.dumps(key if args.device == "cpu" else {**key, "device": args.device}, sort_keys=True)
        cache = {}
        if args.cache and os.path.exists(args.cache):
            with open(args.cache) as f:
                cache = json.load(f)
            cache = cache if cache.get("key") == key else {}
        cache["key"] = key
        scores, cpu, stats = {}, {}, {}
        for name in names:
            if name in cache:
                if cache[name]["heads"] != heads:
                    raise SystemExit(f"--cache {args.cache}: {name}'s scores came from other head weights")
                scores[name], cpu[name], tokens = cache[name]["scores"], cache[name]["cpu_s"], cache[name]["tokens"]
                stats.update(cache[name]["stats"])
                continue
            scores[name], cpu[name], s, tokens = run(path, sets, name, args.device)
            stats.update(s)
            print(f"{name}: {cpu[name]:.0f} CPU-s", file=sys.stderr, flush=True)
            if args.cache:
                cache[name] = {"scores": scores[name], "cpu_s": cpu[name], "tokens": tokens, "stats": s,
                               "heads": heads}
                with open(args.cache, "w") as f:
                    json.dump(cache, f)

    rows = []
    for head in HEADS:
        sc = {name: scores[name][head] for name in names}
        rows += [{"head": head, **compare(sc, name, sets["groups"][1]), "cpu_s": cpu[name]} for name in names]
        full = next((r for r in rows if r["head"] == head and r["engine"] == "fp8"), None)
        for r in rows:   # each ablation engine's share of the whole FP8 margin error's variance
            if r["head"] == head and r["engine"].startswith("fp8:") and full is not None:
                r["margin_err_var_share_of_fp8"] = (r["bf16"]["margin_err_std"] / full["bf16"]["margin_err_std"]) ** 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"commit": commit, "torch": torch.__version__, "device": args.device, "layers": args.layers, "hidden": 4096,
            "intermediate": 14336, "outliers": args.outliers, "pairs": args.pairs, "groups": args.groups,
            "answer_tokens": args.answer_tokens, "seed": args.seed, "calibration_pairs_groups": calibration,
            "engines": names, "heads_sha256": heads, "tokens": tokens, "cpu_s": cpu, **stats}
    print(f"model: 8B layer shape x {args.layers} layer(s), outliers: {args.outliers} (features x{OUTLIER_GAIN:g} in "
          f"6 channels, massive activations x{MASSIVE_GAIN:g} in 2); {args.pairs} HH pairs ({tokens['pairs']} tokens), "
          f"{args.groups} AlpacaEval groups of 15 ({tokens['groups']} tokens, answers cut to {args.answer_tokens})")
    print(f"measured outliers: {stats}; CPU seconds {({k: round(v) for k, v in cpu.items()})}")
    pct = lambda v, d=1: "-" if v is None else f"{100 * v:.{d}f}"   # noqa: E731
    ci = lambda lo_hi: f"[{pct(lo_hi[0])}, {pct(lo_hi[1])}]"   # noqa: E731
    print(f"| head | engine | vs | score err std / score std | margin err std / margin std | pair agreement % [95% CI] "
          f"| expected from margin err % [95% CI] | Gaussian margins: predicted % at margins "
          f"x{' / x'.join(map(str, MARGIN_SCALES))} | margins needed for {TARGET:.1%} | share of fp8's margin err "
          "variance | best-of-15 top-1 % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for ref in ("bf16", "fp32"):
            if ref in r:
                c = r[ref]
                share = r.get("margin_err_var_share_of_fp8") if ref == "bf16" else None
                print(f"| {r['head']} | {r['engine']} | {ref} | {pct(c['score_err_std_over_std'], 2)}% | "
                      f"{pct(c['margin_err_over_margin_std'], 2)}% | {pct(c['agree'])} {ci(c['agree_ci95'])} | "
                      f"{pct(c['expected_agree'], 2)} {ci(c['expected_agree_ci95'])} | "
                      f"{' / '.join(pct(v, 2) for v in c['gaussian_agree_at_margins_x'].values())} | "
                      f"x{c['margins_needed_for_target']:.1f} | {pct(share, 0)} | "
                      f"{pct(c['top1_agree'])} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
