"""FP8 against bf16 on a GPU (sm_89+): the GEMMs at Llama-3-8B's shapes, the quantizing ops, and
the engine's throughput. What a GPU lease runs (bench/gpu_session.sh), after building csrc:

    RMSERVE_BUILD_CSRC=1 pip install --no-build-isolation --no-deps -e .
    python bench/fp8_speed.py --json $OUT/fp8_speed.json

1. GEMMs [T, K] x [K, N] for qkv_proj, o_proj, gate_up_proj and down_proj: torch.mm in bf16
   against torch._scaled_mm (e4m3, row-wise scales, bf16 out), TFLOP/s and the speedup.
2. The quantizing ops at T tokens: csrc kernels against their PyTorch references (and the
   unquantized Triton op beside them), GB/s counted as bytes read + written once.
3. The engine: a random 8B-shaped checkpoint (rmserve.tiny, no data needed) at --layers layers,
   the same token-id samples
   (lengths uniform in [64, 768]) scored by the bf16 engine and the FP8 engine (CUDA graphs on),
   sample tokens/s and the speedup.
Timings: CUDA events, --warmup runs, the median of --repeat runs. Prints tables, writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPES = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)}


def timed(fn, warmup: int, repeat: int) -> float:
    """Median milliseconds of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemms(tokens: list[int], warmup: int, repeat: int) -> list[dict]:
    from rmserve.kernels.fp8_quant import per_token_quant_fp8_ref

    rows = []
    for T in tokens:
        for name, (N, K) in SHAPES.items():
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            qx, sx = per_token_quant_fp8_ref(x)
            qw, sw = per_token_quant_fp8_ref(w)
            sw = sw.reshape(1, -1).contiguous()
            bf16 = timed(lambda: torch.mm(x, w.t()), warmup, repeat)
            fp8 = timed(lambda: torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16),
                        warmup, repeat)
            flop = 2 * T * N * K
            rows.append({"tokens": T, "gemm": name, "N": N, "K": K, "bf16_ms": bf16, "fp8_ms": fp8,
                         "bf16_tflops": flop / bf16 / 1e9, "fp8_tflops": flop / fp8 / 1e9, "speedup": bf16 / fp8})
    return rows


def quant_ops(T: int, warmup: int, repeat: int) -> list[dict]:
    from rmserve.kernels import fp8_quant, rmsnorm, silu_mul

    csrc = fp8_quant.csrc_fp8_ops() if fp8_quant.csrc_blocker() is None else None
    H, inter = 4096, 14336
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.ones(H, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(T, 2 * inter, device="cuda", dtype=torch.bfloat16)
    cases = {  # op -> (csrc call, reference call, unquantized Triton op, bytes moved)
        "add_rms_norm_quant": (lambda o: o.add_rms_norm_quant(x, r, w, 1e-5),
                               lambda: fp8_quant.add_rms_norm_quant_fp8_ref(x, r, w, 1e-5),
                               lambda: rmsnorm.add_rms_norm(x, r, w, 1e-5), T * H * (2 + 2 + 2 + 1)),
        "silu_mul_quant": (lambda o: o.silu_mul_quant(gu), lambda: fp8_quant.silu_mul_quant_fp8_ref(gu),
                           lambda: silu_mul.silu_mul(gu), T * inter * (4 + 1)),
        "per_token_quant": (lambda o: o.per_token_quant(x), lambda: fp8_quant.per_token_quant_fp8_ref(x),
                            None, T * H * (2 + 1)),
    }
    rows = []
    for name, (kernel, ref, triton_op, nbytes) in cases.items():
        row = {"op": name, "tokens": T, "bytes": nbytes, "ref_ms": timed(ref, warmup, repeat)}
        if csrc is not None:
            row["csrc_ms"] = timed(lambda: kernel(csrc), warmup, repeat)
            row["csrc_GBps"] = nbytes / row["csrc_ms"] / 1e6
        if triton_op is not None:
            row["triton_unquantized_ms"] = timed(triton_op, warmup, repeat)
        rows.append(row)
    return rows


def engine_throughput(layers: int, samples: int, warmup: int, repeat: int) -> list[dict]:
    from rmserve import Engine
    from rmserve.tiny import write_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(os.path.join(tmp, "rm"), "bt", hidden=4096, layers=layers, heads=32, kv_heads=8,
                                     intermediate=14336)
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        rng = random.Random(0)
        ids = [[rng.randrange(vocab) for _ in range(rng.randint(64, 768))] for _ in range(samples)]
        base = None
        for name, settings in {"bf16": {"dtype": "bfloat16"}, "fp8": {"quantization": "fp8"}}.items():
            engine = Engine.from_pretrained(path, device="cuda", share_prefix=False, **settings)
            ms = timed(lambda: engine.score(ids), warmup, repeat)
            scores = torch.tensor([r.score for r in engine.score(ids)])
            base = scores if base is None else base
            n = sum(len(s) for s in ids)
            rows.append({"engine": name, "layers": layers, "samples": samples, "tokens": n, "ms": ms,
                         "tokens_per_s": n / ms * 1e3, "quant_kernels": engine.config.quant_kernels,
                         "max_abs_score_diff_vs_bf16": (scores - base).abs().max().item()})
            engine = None   # frees its weights before the next engine loads
            torch.cuda.empty_cache()
    rows[1]["speedup"] = rows[0]["ms"] / rows[1]["ms"]
    return rows


def commit() -> str:
    """RMSERVE_COMMIT (gpu_session.sh sets it: the device machine gets the tree without .git, perhaps
    without git), else git's short hash, else 'unknown'."""
    try:
        return os.environ.get("RMSERVE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384], help="GEMM rows (tokens)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the engine's 8B-shaped model (0: skip)")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "fp8_speed.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        sys.exit("fp8_speed.py needs a CUDA GPU of compute capability 8.9+")
    t0 = time.time()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
           "gemms": gemms(args.tokens, args.warmup, args.repeat),
           "quant_ops": quant_ops(max(args.tokens), args.warmup, args.repeat)}
    print(f"{out['device']}, torch {out['torch']}\n| tokens | GEMM | N x K | bf16 TFLOP/s | fp8 TFLOP/s | speedup |")
    print("|---|---|---|---|---|---|")
    for r in out["gemms"]:
        print(f"| {r['tokens']} | {r['gemm']} | {r['N']}x{r['K']} | {r['bf16_tflops']:.0f} | {r['fp8_tflops']:.0f} | "
              f"{r['speedup']:.2f}x |")
    print("| op | tokens | csrc ms | csrc GB/s | reference ms | Triton op without quant ms |\n|---|---|---|---|---|---|")
    for r in out["quant_ops"]:
        print(f"| {r['op']} | {r['tokens']} | {r.get('csrc_ms', float('nan')):.3f} | {r.get('csrc_GBps', float('nan')):.0f} | "
              f"{r['ref_ms']:.3f} | {r.get('triton_unquantized_ms', float('nan')):.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:   # written now too: the engine part builds a checkpoint and may run out of time
        json.dump(out, f, indent=2)
    if args.layers > 0:
        out["engine"] = engine_throughput(args.layers, args.samples, args.warmup, args.repeat)
        print("| engine | layers | samples | tokens/s | speedup | quant kernels | max |score - bf16| |")
        print("|---|---|---|---|---|---|---|")
        for r in out["engine"]:
            print(f"| {r['engine']} | {r['layers']} | {r['samples']} | {r['tokens_per_s']:.0f} | "
                  f"{r.get('speedup', 1):.2f}x | {r['quant_kernels']} | {r['max_abs_score_diff_vs_bf16']:.3f} |")
    out["seconds"] = time.time() - t0
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
