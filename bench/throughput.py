"""Throughput: rmserve (packed, Engine.score_stream) against transformers'
AutoModelForSequenceClassification (LlamaForSequenceClassification, sdpa) with padded batches of
8/16/32 in input order and sorted by length, on the same samples and the same weights.

    python bench/throughput.py                                  # CPU: small shape, 256 rows, fp32
    python bench/throughput.py --device cuda --shape 8b         # GPU: Llama-3.1-8B shape, bf16
    python bench/throughput.py --device cuda --share-prefix both --eager   # + sharing off, + eager

rmserve runs as users get it: prompt sharing on (`--share-prefix off` or `both` for the other
configuration), CUDA graphs on CUDA (`--eager` adds an enforce_eager row); how many batches
replayed a graph and how many ran eagerly (warm-up included) is printed and kept in the JSON.

Per row: useful tokens/s (the samples' own tokens; padding is not counted), samples/s, the share
of computed tokens that are useful, MFU (model FLOPs of the useful tokens per second over the
matmul peak measured in the same run), peak GPU memory, and the largest score difference from
rmserve's (transformers scores the same backbone; for ArmoRM it gets a BT head, there is no
ArmoRM class in transformers, so the difference is not reported). The weights are random (the
work is real, the scores meaningless). Prints a table; --json writes it with the environment.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

import rmbench


def clocks():
    return time.perf_counter(), time.process_time()


def since(start):
    """(wall seconds, this process's CPU seconds) since `start`."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def run_rmserve(engine, samples, device):
    rmbench.sync(device)
    start = clocks()
    scores = rmbench.rmserve_score(engine, samples)
    rmbench.sync(device)
    return scores, since(start)


def run_hf(hf, samples, batch_size, order, device):
    rmbench.sync(device)
    start = clocks()
    scores, padded = rmbench.hf_score(hf, samples, batch_size, order, device)
    rmbench.sync(device)
    return scores, padded, since(start)


def row(name, family, times, work, computed, peak, cfg, mem=None, diff=None):
    seconds, cpu_seconds = times
    useful = work.tokens
    flops = sum(rmbench.flops_per_sample(cfg, len(s)) for s in work.samples)
    return {"system": name, "head": family, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "tokens_per_s": round(useful / seconds, 1), "tokens_per_cpu_s": round(useful / cpu_seconds, 1),
            "samples_per_s": round(len(work.samples) / seconds, 2),
            "useful_fraction": round(useful / computed, 3), "tflops": round(flops / seconds / 1e12, 3),
            "mfu": round(flops / seconds / peak, 4), "peak_mem_gib": mem,
            "max_score_diff": None if diff is None else float(f"{diff:.3g}")}


def peak_mem(device):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def reset_mem(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def print_table(rows, base, base_cpu):
    print(f"{'system':<34}{'head':<8}{'tokens/s':>10}{'samples/s':>10}{'tok/CPU-s':>10}{'useful':>7}{'MFU':>7}"
          f"{'mem GiB':>8}{'vs best HF':>11}{'(CPU-s)':>8}{'max diff':>9}")
    for r in rows:
        ratio = r["tokens_per_s"] / base if base else float("nan")
        ratio_cpu = r["tokens_per_cpu_s"] / base_cpu if base_cpu else float("nan")
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        diff = "-" if r["max_score_diff"] is None else f"{r['max_score_diff']:.2g}"
        print(f"{r['system']:<34}{r['head']:<8}{r['tokens_per_s']:>10.0f}{r['samples_per_s']:>10.1f}"
              f"{r['tokens_per_cpu_s']:>10.0f}{r['useful_fraction']:>7.2f}{100 * r['mfu']:>6.1f}%{mem:>8}"
              f"{ratio:>10.2f}x{ratio_cpu:>7.2f}x{diff:>9}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(rmbench.SHAPES), default=None, help="default: 8b on cuda, small on cpu")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--families", default="bt,armorm")
    ap.add_argument("--rows", type=int, default=None, help="samples (a seeded subset); default 1000 cuda, 256 cpu")
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--orders", default="input,sorted")
    ap.add_argument("--naive", action=argparse.BooleanOptionalAction, default=None,
                    help="also transformers one sample at a time (no padding); default on for cpu")
    ap.add_argument("--share-prefix", choices=("on", "off", "both"), default="on",
                    help="rmserve's prompt sharing: on (the default users get), off, or both (a row each)")
    ap.add_argument("--eager", action="store_true",
                    help="also rmserve with enforce_eager=True (cuda; with the first --share-prefix setting)")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="rmserve's token budget; default 16384 on cuda, 4096 on cpu (cache-friendlier there)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.max_batch_tokens or (16384 if cuda else 4096)
    shape = args.shape or ("8b" if cuda else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    n = args.rows or (1000 if cuda else 256)
    naive = (not cuda) if args.naive is None else args.naive
    families = args.families.split(",")
    shares = {"on": [True], "off": [False], "both": [True, False]}[args.share_prefix]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    orders = [o for o in args.orders.split(",") if o]

    peak = rmbench.matmul_peak(args.device, dtype)
    tokenizer = rmbench.load_tokenizer() or rmbench.fallback_tokenizer()
    print(f"matmul peak {peak / 1e12:.2f} TFLOP/s ({dtype}, {args.device})", file=sys.stderr)
    rows, work, hf_done = [], None, False
    meta = {}
    for family in families:
        cfg = rmbench.llama_config(shape, family, args.layers)
        model = rmbench.random_model(cfg, args.device, dtype)
        ours = None
        for share in shares:
            t0 = time.perf_counter()
            engine = rmbench.make_engine(model, tokenizer, max_batch_tokens=budget, share_prefix=share)
            setup = time.perf_counter() - t0
            if work is None:
                work = rmbench.workload(n, gating=rmbench.gating_pattern(tokenizer))
                print(f"workload: {work.source}: {len(work.samples)} samples, {work.tokens} tokens", file=sys.stderr)
            label = f"{family}, sharing {'on' if share else 'off'}"
            meta[label] = {"engine_setup_s": round(setup, 2), "max_batch_tokens": engine.config.max_batch_tokens,
                           "attention": engine.attention, "kernels": engine.config.kernels,
                           "graphs": None if engine.graphs is None else len(engine.graphs.buckets)}
            rmbench.rmserve_score(engine, work.samples[:64])                  # warm-up
            reset_mem(args.device)
            scores, seconds = run_rmserve(engine, work.samples, args.device)
            ours = scores if ours is None else ours
            name = "rmserve packed" + ("" if share else ", no sharing")
            rows.append(row(name, family, seconds, work, work.tokens, peak, cfg, peak_mem(args.device)))
            if engine.graphs is not None:   # how many batches replayed a graph and how many ran eagerly
                meta[label].update(graph_replays=sum(engine.graphs.replays.values()), eager_batches=engine.graphs.eager)
                print(f"{label}: {meta[label]['graph_replays']} batches replayed a graph, "
                      f"{meta[label]['eager_batches']} ran eagerly", file=sys.stderr)
            print_table(rows[-1:], 0, 0)
            del engine
            gc.collect()
            if args.eager and cuda and share == shares[0]:
                eager = rmbench.make_engine(model, tokenizer, max_batch_tokens=budget, share_prefix=share,
                                            enforce_eager=True)
                reset_mem(args.device)
                _, seconds = run_rmserve(eager, work.samples, args.device)
                rows.append(row(name + ", eager", family, seconds, work, work.tokens, peak, cfg, peak_mem(args.device)))
                print_table(rows[-1:], 0, 0)
                del eager
                gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if not hf_done:   # transformers gets a BT head whatever the family: run it once
            hf = rmbench.hf_model(model, cfg)
            rmbench.hf_score(hf, work.samples[:16], 8, "input", args.device)   # warm-up
            configs = [(b, o) for b in sizes for o in orders] + ([(1, "input")] if naive else [])
            for b, o in configs:
                reset_mem(args.device)
                theirs, padded, seconds = run_hf(hf, work.samples, b, o, args.device)
                diff = max(abs(a - c) for a, c in zip(ours, theirs)) if family == "bt" else None
                name = "transformers, one at a time" if b == 1 else f"transformers padded b{b}, {o}"
                rows.append(row(name, "bt", seconds, work, padded, peak, cfg, peak_mem(args.device), diff))
                print_table(rows[-1:], 0, 0)
            del hf
            hf_done = True
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    hf_rows = [r for r in rows if r["system"].startswith("transformers padded")]
    best = max((r["tokens_per_s"] for r in hf_rows), default=0)
    best_cpu = max((r["tokens_per_cpu_s"] for r in hf_rows), default=0)
    print()
    print_table(rows, best, best_cpu)
    env = rmbench.environment(args.device)
    print(f"\n{env['device']}, {env['date']}, commit {env['commit']}, torch {env['torch']}, "
          f"transformers {env['transformers']}; shape {shape}"
          f"{'' if args.layers is None else f' ({args.layers} layers)'}, {dtype}; {work.source}; "
          f"matmul peak {peak / 1e12:.3f} TFLOP/s; {torch.get_num_threads()} torch threads; 'vs best HF': "
          f"tokens/s (and tokens per CPU-second) over the best padded transformers row's")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "shape": shape, "share_prefix": args.share_prefix, "layers": args.layers,
                       "dtype": str(dtype),
                       "workload": work.source, "samples": len(work.samples), "tokens": work.tokens,
                       "matmul_peak_tflops": round(peak / 1e12, 4), "threads": torch.get_num_threads(),
                       "engines": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
