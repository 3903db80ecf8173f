"""Shared-prefix scoring: tokens computed and tokens/s with and without sharing, beside the
N(P+R) / (P+NR) prediction, on real pair and best-of-N workloads.

    python bench/prefix_sharing.py                       # CPU, small random model, both sets
    python bench/prefix_sharing.py --pairs 2312 --prompts 805 --device cuda --hidden 4096 ...

Data (see ../shared/data/README.md): HH-RLHF harmless pairs (chosen and rejected share the
dialogue before the last answer) and AlpacaEval best-of-15 (15 answers per instruction),
rendered with the Llama 3 tokenizer and chat template; and a synthetic set of token ids with
long prompts (default 1,000-token prompts with 8 answers of 300, predicted 3x). The model is random (scores are
meaningless; the work is real): a checkpoint written by rmserve.tiny with the real tokenizer
files copied in and vocab_size set to fit them.

Per set it prints: samples, tokens in the samples, tokens computed with sharing (the engine's
own plan, budget splits included), the prediction N(P+R)/(P+NR) from the set's mean group size
N, shared prompt P and own tokens R, the ideal ratio summed group by group, the measured
wall-time speedup and tokens/s (sample tokens per second) both ways, and the largest score
difference between the two runs. A JSON row per set goes to --json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

from rmserve import Engine
from rmserve.inputs import Encoded
from rmserve.prefix import computed_tokens, find_groups, plan_call
from rmserve.tiny import write_tiny_checkpoint

DATA = os.environ.get("RMSERVE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def build_checkpoint(path: str, family: str, hidden: int, layers: int, heads: int, kv_heads: int,
                     intermediate: int, tokenizer_dir: str) -> str:
    """A random checkpoint with a real tokenizer's files (tokenizer_dir); embeddings resized to its vocabulary."""
    write_tiny_checkpoint(path, family, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                          intermediate=intermediate, gating_hidden_dim=64, vhead_num_neurons=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    vocab = len(tok)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(0)
    tensors["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g)
    if "lm_head.weight" in tensors:
        tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def read_jsonl_gz(path: str):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def hh_pairs(limit: int):
    convs, keys = [], []
    for i, row in enumerate(read_jsonl_gz(os.path.join(DATA, "hh_rlhf_harmless_test.jsonl.gz"))):
        if i >= limit:
            break
        for side in ("chosen", "rejected"):
            convs.append(row[side])
            keys.append(row["pair_id"])
    return convs, keys


def alpaca_bon(limit: int):
    convs, keys, seen = [], [], []
    for row in read_jsonl_gz(os.path.join(DATA, "alpaca_eval_bon.jsonl.gz")):
        pid = row["prompt_id"]
        if pid not in seen:
            if len(seen) >= limit:
                continue
            seen.append(pid)
        convs.append(row["messages"])
        keys.append(pid)
    return convs, keys


def synthetic(engine: Engine, groups: int, prompt: int, answers: int, answer: int, seed: int = 0):
    """Token-id samples: `groups` prompts of `prompt` tokens (ending with the gating pattern), each
    with `answers` random answers of `answer` tokens: the issue's 1,000-token, 8 x 300 example."""
    import random

    rng = random.Random(seed)
    pre = engine.preprocessor
    tail = list(pre.gating_pattern) if pre.gating_pattern else []
    convs, keys = [], []
    for gi in range(groups):
        p = [pre.bos_id] + [rng.randrange(128000) for _ in range(prompt - 1 - len(tail))] + tail
        for _ in range(answers):
            convs.append(p + [rng.randrange(128000) for _ in range(answer)])
            keys.append(gi)
    return convs, keys


def prediction(encoded: list[Encoded], keys: list) -> dict:
    """N(P+R)/(P+NR) from the set's means, and the ideal ratio summed over groups (no budget)."""
    seqs = [e.ids for e in encoded]
    groups = find_groups(seqs, keys, min_shared=1)
    sizes = [len(g.members) for g in groups]
    prompts = [g.prefix for g in groups]
    own = [len(seqs[m]) - g.prefix for g in groups for m in g.members]
    n, p, r = statistics.mean(sizes), statistics.mean(prompts), statistics.mean(own)
    total = sum(len(s) for s in seqs)
    ideal = sum(g.cost([len(s) for s in seqs]) for g in groups)
    return {"N": n, "P": p, "R": r, "predicted": n * (p + r) / (p + n * r), "ideal": total / ideal}


def timed(engine: Engine, convs, keys) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, results) of one call. On a shared CPU the process time
    is the steadier measure of the work done (other processes inflate the wall time)."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    results = engine.score(convs, groups=keys)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0, results


def compare_modes(modes: dict[str, tuple[Engine, list | None]], convs, repeats: int):
    """Each mode (name -> engine, group hints) warmed up on 8 samples, then `repeats` timed runs of
    every mode, interleaved. -> (runs: mode -> [(wall, cpu)], medians: mode -> (wall, cpu), last
    results per mode)."""
    for engine, hints in modes.values():
        engine.score(convs[:8], groups=None if hints is None else hints[:8])
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    results = {}
    for _ in range(repeats):
        for mode, (engine, hints) in modes.items():
            wall, cpu, results[mode] = timed(engine, convs, hints)
            runs[mode].append((wall, cpu))
    medians = {m: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r)) for m, r in runs.items()}
    return runs, medians, results


def timing_fields(runs: dict, medians: dict, base: str, other: str) -> dict:
    """A JSON row's timing entries: median wall and CPU seconds, every run, and the speedup of `other`."""
    row = {f"{k}_s_{m}": round(medians[m][i], 2) for i, k in enumerate(("wall", "cpu")) for m in (base, other)}
    row.update({f"runs_{m}": [[round(w, 2), round(c, 2)] for w, c in runs[m]] for m in (base, other)})
    row.update({f"speedup_{k}": round(medians[base][i] / medians[other][i], 3) for i, k in enumerate(("wall", "cpu"))})
    return row


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return ""


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The random model's shape, the engine's device and budget, the repeats (bench/prm_sharing.py too)."""
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, interleaved; medians")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: process time = work done)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="armorm")
    ap.add_argument("--pairs", type=int, default=300, help="HH-RLHF pairs to score (of 2,312)")
    ap.add_argument("--prompts", type=int, default=25, help="AlpacaEval instructions to score, 15 answers each (of 805)")
    ap.add_argument("--sets", default="hh,alpaca,synthetic", help="comma-separated: hh, alpaca, synthetic")
    ap.add_argument("--synthetic", default="4,1000,8,300", help="groups,prompt,answers,answer tokens")
    add_run_args(ap)
    ap.add_argument("--json", default=None, help="append one JSON row per set here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="rmserve-prefix-bench-")
    try:
        path = build_checkpoint(tmp, args.family, args.hidden, args.layers, args.heads, args.kv_heads,
                                args.intermediate, os.path.join(DATA, "llama3-tokenizer"))
        common = dict(dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens)
        plain = Engine.from_pretrained(path, share_prefix=False, **common)
        shared = Engine.from_pretrained(path, share_prefix=True, **common)
        device = torch.cuda.get_device_name() if plain.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        print(f"model: {args.family}, {args.layers} layers, hidden {args.hidden}, {plain.dtype}, {device}, "
              f"attention {plain.attention}, budget {args.max_batch_tokens} tokens")
        sets = {
            "hh": lambda: ("hh_rlhf_pairs", hh_pairs(args.pairs)),
            "alpaca": lambda: ("alpaca_eval_bo15", alpaca_bon(args.prompts)),
            "synthetic": lambda: ("synthetic_" + args.synthetic.replace(",", "_"),
                                  synthetic(plain, *map(int, args.synthetic.split(",")))),
        }
        for key in args.sets.split(","):
            name, (convs, keys) = sets[key]()
            encoded = plain.encode(convs)
            ok = [i for i, e in enumerate(encoded) if isinstance(e, Encoded)]
            convs, keys, encoded = [convs[i] for i in ok], [keys[i] for i in ok], [encoded[i] for i in ok]
            lengths = [len(e) for e in encoded]
            total = sum(lengths)
            cfg = shared.config
            with_hints = computed_tokens(plan_call(encoded, keys, min_shared=cfg.share_min_tokens,
                                                   max_tokens=cfg.max_batch_tokens, max_seqs=cfg.max_batch_seqs), lengths)
            auto = computed_tokens(plan_call(encoded, None, min_shared=cfg.share_min_tokens,
                                             max_tokens=cfg.max_batch_tokens, max_seqs=cfg.max_batch_seqs), lengths)
            pred = prediction(encoded, keys)
            runs, medians, results = compare_modes({"plain": (plain, None), "shared": (shared, keys)}, convs,
                                                   args.repeats)
            (t_plain, c_plain), (t_shared, c_shared) = medians["plain"], medians["shared"]
            diff = max(abs(a.score - b.score) for a, b in zip(results["plain"], results["shared"]))
            row = {
                "set": name, "samples": len(encoded), "tokens": total,
                "computed_shared": with_hints, "computed_shared_auto": auto,
                "computed_ratio": total / with_hints, "computed_ratio_auto": total / auto,
                "N": round(pred["N"], 2), "P": round(pred["P"], 1), "R": round(pred["R"], 1),
                "predicted": round(pred["predicted"], 3), "ideal": round(pred["ideal"], 3),
                **timing_fields(runs, medians, "plain", "shared"),
                "tokens_per_s_plain": round(total / t_plain), "tokens_per_s_shared": round(total / t_shared),
                "tokens_per_cpu_s_plain": round(total / c_plain), "tokens_per_cpu_s_shared": round(total / c_shared),
                "max_abs_score_diff": diff,
                "device": device, "dtype": str(plain.dtype), "family": args.family,
                "model": f"{args.layers}x{args.hidden}", "commit": commit(),
            }
            print(f"\n{name}: {row['samples']} samples, {total} tokens; N={row['N']} P={row['P']} R={row['R']}")
            print(f"  predicted N(P+R)/(P+NR) = {row['predicted']:.3f}   ideal (per group) = {row['ideal']:.3f}")
            print(f"  tokens computed: {total} plain, {with_hints} shared (x{row['computed_ratio']:.3f}), "
                  f"{auto} with automatic grouping (x{row['computed_ratio_auto']:.3f})")
            print(f"  wall (median of {args.repeats}): {t_plain:.2f} s plain, {t_shared:.2f} s shared -> "
                  f"x{row['speedup_wall']:.3f}; {row['tokens_per_s_plain']} vs {row['tokens_per_s_shared']} sample tokens/s")
            print(f"  process CPU time: {c_plain:.2f} s plain, {c_shared:.2f} s shared -> x{row['speedup_cpu']:.3f}; "
                  f"{row['tokens_per_cpu_s_plain']} vs {row['tokens_per_cpu_s_shared']} sample tokens per CPU-s")
            print(f"  largest |score difference| {diff:.2e}")
            if args.json:
                with open(args.json, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
