"""Latency of one 512-token request, CUDA graphs on and off, against its floors.

    python bench/latency.py                          # CPU: small shape (eager only: no graphs on CPU)
    python bench/latency.py --device cuda --shape 8b

Per engine: the median (p10, p90) of Engine.score([ids]) end to end (packing, copies, forward,
results) and of Engine.forward alone; the compute floor (the request's FLOPs over the matmul
peak measured now) and the weight-read floor (the weights' bytes over a copy bandwidth measured
now): a forward cannot beat the larger of the two.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch

import rmbench
from rmserve.packing import pack


def timed(fn, device: str, reps: int) -> list[float]:
    fn()
    rmbench.sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        rmbench.sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_ms": round(1e3 * statistics.median(times), 3), "p10_ms": round(1e3 * q[0], 3),
            "p90_ms": round(1e3 * q[-1], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(rmbench.SHAPES), default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--family", default="bt")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=None, help="default 50 cuda, 5 cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("8b" if cuda else "small")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = args.reps or (50 if cuda else 5)

    cfg = rmbench.llama_config(shape, args.family, args.layers)
    model = rmbench.random_model(cfg, args.device, dtype)
    tokenizer = rmbench.load_tokenizer() or rmbench.fallback_tokenizer()
    peak = rmbench.matmul_peak(args.device, dtype)
    bandwidth = rmbench.copy_bandwidth(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.backbone.parameters()
                       if p is not model.backbone.embed_tokens.weight)
    compute_floor = rmbench.flops_per_sample(cfg, args.tokens) / peak
    read_floor = weight_bytes / bandwidth

    rng = random.Random(0)
    engines = {"graphs": {}, "eager": {"enforce_eager": True}} if cuda else {"eager": {}}
    rows = []
    for name, settings in engines.items():
        engine = rmbench.make_engine(model, tokenizer, share_prefix=False, **settings)
        ids = [128000] + [rng.randrange(1000, 128000) for _ in range(args.tokens - 1)]
        if engine.model.head.needs_gate:
            pattern = list(engine.preprocessor.gating_pattern)
            ids[34:34 + len(pattern)] = pattern
        enc = engine.encode([ids])[0]
        batch = pack([enc.ids], [enc.gate] if engine.model.head.needs_gate else None, device=engine.device)
        end_to_end = timed(lambda: engine.score([ids]), args.device, reps)
        forward = timed(lambda: engine.forward(batch), args.device, reps)
        rows.append({"engine": name, "score": summary(end_to_end), "forward": summary(forward)})
        del engine, batch
        gc.collect()   # the graphs' memory pool is held by a reference cycle: freed before the next engine plans
        if cuda:
            torch.cuda.empty_cache()

    env = rmbench.environment(args.device)
    print(f"{'engine':<8}{'score() median':>16}{'p10':>10}{'p90':>10}{'forward median':>16}{'p10':>10}{'p90':>10}")
    for r in rows:
        s, f = r["score"], r["forward"]
        print(f"{r['engine']:<8}{s['median_ms']:>14.2f}ms{s['p10_ms']:>8.2f}ms{s['p90_ms']:>8.2f}ms"
              f"{f['median_ms']:>14.2f}ms{f['p10_ms']:>8.2f}ms{f['p90_ms']:>8.2f}ms")
    print(f"floors: compute {1e3 * compute_floor:.2f} ms ({rmbench.flops_per_sample(cfg, args.tokens) / 1e9:.1f} "
          f"GFLOP at {peak / 1e12:.3f} TFLOP/s), weight read {1e3 * read_floor:.2f} ms "
          f"({weight_bytes / 2**30:.2f} GiB at {bandwidth / 1e9:.0f} GB/s)")
    print(f"{env['device']}, {env['date']}, commit {env['commit']}, torch {env['torch']}; shape {shape}, "
          f"{dtype}, {args.family}, {args.tokens} tokens, {reps} reps")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "shape": shape, "layers": args.layers, "family": args.family,
                       "tokens": args.tokens, "reps": reps, "matmul_peak_tflops": round(peak / 1e12, 3),
                       "copy_bandwidth_gbs": round(bandwidth / 1e9, 1),
                       "compute_floor_ms": round(1e3 * compute_floor, 3), "read_floor_ms": round(1e3 * read_floor, 3),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
