"""Where the time of a steady-state batch goes, against the compute floor, and how long the
device idles between batches of a stream.

    python bench/profile_batch.py                                      # CPU: small shape, fp32
    python bench/profile_batch.py --device cuda --shape 8b --json profile_8b.json

1. Breakdown. The fullest batch the stream scheduler packs from the workload (the engine's token
   budget) runs eagerly with a timer around each part of the forward: embedding, RMSNorm (+ the
   residual add), QKV, RoPE, attention, O, gate/up, SiLU*up, down, head. On CUDA each part is a
   pair of events (the host runs ahead of the device, so a pair times the device's work); on the
   CPU, host clocks. Per part: milliseconds per forward (median over --reps), share, FLOPs,
   achieved TFLOP/s and its share of the matmul peak measured in the same run, the part's own
   floor (the larger of FLOPs over that peak and its fewest bytes over the copy bandwidth measured
   now), and its loss against the compute floor (time - FLOPs / peak). The three largest losses
   are printed last. Uninstrumented eager and graph-replay times of the same batch show what the
   timers cost.
2. Host gaps. Engine.score_stream over --stream-rows samples with an event pair around every
   batch's forward: the device's busy time, the gaps between one batch's end and the next one's
   start (the device waiting on the host), and the largest gap.
--trace writes a torch.profiler Chrome trace of one eager forward for reading by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import defaultdict

import torch

import rmbench
from rmserve.scheduler import stream_batches

GEMMS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
PARTS = ("embed", "norm", "qkv_proj", "rope", "attention", "o_proj", "gate_up_proj", "silu_mul", "down_proj", "head")


class PartTimer:
    """Marks around callables: CUDA events on a GPU, host clocks elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []
        self.enabled = False

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            start = self.now()
            out = fn(*args, **kwargs)
            self.marks.append((name, start, self.now()))
            return out
        return timed

    def take(self) -> dict[str, float]:
        """Milliseconds per part since the last take."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.marks:
            out[name] += self.elapsed_ms(start, end)
        self.marks = []
        return dict(out)


def instrument(engine, timer: PartTimer) -> None:
    """Timers around every part of the engine's forward (module forwards, the fused ops, the
    attention function). They pass straight through while timer.enabled is False."""
    backbone, head = engine.model.backbone, engine.model.head
    backbone.embed_tokens.forward = timer.wrap("embed", backbone.embed_tokens.forward)
    for layer in backbone.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = timer.wrap("norm", norm.forward)
        for name in ("qkv_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            proj.forward = timer.wrap(name, proj.forward)
        for name in ("gate_up_proj", "down_proj"):
            proj = getattr(layer.mlp, name)
            proj.forward = timer.wrap(name, proj.forward)
    backbone.norm.forward = timer.wrap("norm", backbone.norm.forward)
    ops = engine.ops
    timed_ops = dataclasses.replace(ops, rope=timer.wrap("rope", ops.rope), silu_mul=timer.wrap("silu_mul", ops.silu_mul))
    backbone.use_kernels(timed_ops)
    backbone.attn = timer.wrap("attention", backbone.attn)
    head.packed = timer.wrap("head", head.packed)


def part_work(cfg: dict, lengths: list[int], elem_bytes: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, fewest bytes moved) of each part for one forward over sequences of `lengths`."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    t = sum(lengths)
    e = elem_bytes

    def gemm(n_in, n_out):   # activations in and out, weights once
        return 2.0 * t * n_in * n_out * layers, float(e * (t * (n_in + n_out) + n_in * n_out) * layers)

    pairs = sum(n * (n + 1) / 2 for n in lengths)
    return {
        "embed": (0.0, float(e * 2 * t * h)),
        "norm": (0.0, float(e * t * h * 4 * (2 * layers + 1))),         # add+norm: read 2, write 2
        "qkv_proj": gemm(h, q + 2 * kv),
        "rope": (0.0, float(e * 2 * t * (q + kv) * layers)),           # in place: read and write q, k
        "attention": (4.0 * cfg["num_attention_heads"] * hd * pairs * layers,
                      float(e * t * (2 * q + 2 * kv) * layers)),         # read q, k, v; write o
        "o_proj": gemm(q, h),
        "gate_up_proj": gemm(h, 2 * inter),
        "silu_mul": (0.0, float(e * 3 * t * inter * layers)),
        "down_proj": gemm(inter, h),
        "head": (0.0, 0.0),
    }


def median_ms(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        rmbench.sync(device)
        t0 = time.perf_counter()
        fn()
        rmbench.sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def steady_batch(engine, samples: list[list[int]]):
    """The fullest batch the stream scheduler makes of `samples` under the engine's budget."""
    cfg = engine.config
    batches = stream_batches(samples, len, cfg.max_batch_tokens, cfg.max_batch_seqs, cfg.lookahead)
    best = max(batches, key=lambda b: sum(map(len, b)))
    encoded = engine.encode(best)
    return engine.make_batch(encoded), [len(s) for s in best]


def breakdown(engine, batch, lengths, cfg, peak, bandwidth, reps, device):
    timer = PartTimer(engine.device)
    instrument(engine, timer)
    timer.enabled = True
    engine.forward_eager(batch)   # warm-up
    timer.take()
    per_rep: dict[str, list[float]] = defaultdict(list)
    totals = []
    for _ in range(reps):
        start = timer.now()
        engine.forward_eager(batch)
        end = timer.now()
        parts = timer.take()
        totals.append(timer.elapsed_ms(start, end))
        for name in PARTS:
            per_rep[name].append(parts.get(name, 0.0))
    timer.enabled = False
    total = statistics.median(totals)
    elem = torch.finfo(engine.dtype).bits // 8
    work = part_work(cfg, lengths, elem)
    rows = []
    for name in PARTS:
        ms = statistics.median(per_rep[name])
        flops, nbytes = work[name]
        compute_ms = 1e3 * flops / peak
        rows.append({"part": name, "ms": round(ms, 3), "share": round(ms / total, 4), "gflop": round(flops / 1e9, 1),
                     "tflops": round(flops / ms / 1e9, 2) if ms else None,
                     "of_peak": round(compute_ms / ms, 3) if ms and flops else None,
                     "floor_ms": round(max(compute_ms, 1e3 * nbytes / bandwidth), 3),
                     "loss_ms": round(ms - compute_ms, 3)})
    rest = total - sum(r["ms"] for r in rows)
    rows.append({"part": "between parts", "ms": round(rest, 3), "share": round(rest / total, 4), "gflop": 0.0,
                 "tflops": None, "of_peak": None, "floor_ms": 0.0, "loss_ms": round(rest, 3)})
    flops = sum(w[0] for w in work.values())
    return {"total_ms": round(total, 3), "gflop": round(flops / 1e9, 1), "compute_floor_ms": round(1e3 * flops / peak, 3),
            "mfu": round(flops / (total / 1e3) / peak, 4), "parts": rows}


def host_gaps(engine, samples, device) -> dict:
    """score_stream with an event pair around every batch's forward."""
    timer = PartTimer(engine.device)
    timer.enabled = True
    model = engine.model_forward   # what the pipeline calls (engine.forward is not on score_stream's path)
    forward = model.forward
    model.forward = timer.wrap("batch", forward)
    start = time.perf_counter()
    try:
        for _ in engine.score_stream(samples):
            pass
        rmbench.sync(device)
    finally:
        del model.forward   # the class's method again
    wall = 1e3 * (time.perf_counter() - start)
    marks = timer.marks
    busy = [timer.elapsed_ms(s, e) for _, s, e in marks]
    gaps = [timer.elapsed_ms(marks[i][2], marks[i + 1][1]) for i in range(len(marks) - 1)]
    span = timer.elapsed_ms(marks[0][1], marks[-1][2]) if marks else 0.0
    return {"batches": len(marks), "wall_ms": round(wall, 1), "device_span_ms": round(span, 1),
            "busy_ms": round(sum(busy), 1), "gap_ms": round(sum(gaps), 1),
            "idle_share": round(sum(gaps) / span, 4) if span else None,
            "largest_gap_ms": round(max(gaps), 3) if gaps else None,
            "median_batch_ms": round(statistics.median(busy), 3) if busy else None}


def write_trace(engine, batch, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    engine.forward_eager(batch)
    with profile(activities=activities) as prof:
        engine.forward_eager(batch)
        rmbench.sync(str(engine.device))
    prof.export_chrome_trace(path)


def print_breakdown(b: dict) -> None:
    print(f"{'part':<15}{'ms':>9}{'share':>8}{'GFLOP':>10}{'TFLOP/s':>9}{'of peak':>8}{'floor ms':>10}{'loss ms':>9}")
    for r in b["parts"]:
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        of = "-" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
        print(f"{r['part']:<15}{r['ms']:>9.2f}{100 * r['share']:>7.1f}%{r['gflop']:>10.1f}{tf:>9}{of:>8}"
              f"{r['floor_ms']:>10.2f}{r['loss_ms']:>9.2f}")
    print(f"{'forward':<15}{b['total_ms']:>9.2f}{100.0:>7.1f}%{b['gflop']:>10.1f}{'':>9}{100 * b['mfu']:>7.0f}%"
          f"{b['compute_floor_ms']:>10.2f}{b['total_ms'] - b['compute_floor_ms']:>9.2f}")
    worst = sorted(b["parts"], key=lambda r: -r["loss_ms"])[:3]
    print("largest losses against the compute floor: " +
          "; ".join(f"{r['part']} {r['loss_ms']:.2f} ms ({100 * r['loss_ms'] / b['total_ms']:.0f}%)" for r in worst))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(rmbench.SHAPES), default=None, help="default: 8b on cuda, small on cpu")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--family", default="bt", choices=["bt", "armorm"])
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default 16384 on cuda, 4096 on cpu")
    ap.add_argument("--rows", type=int, default=None, help="workload samples; default 2000 cuda, 200 cpu")
    ap.add_argument("--stream-rows", type=int, default=None, help="samples for the host-gap run; default --rows")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards; default 10 cuda, 3 cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trace", default=None, help="write a Chrome trace of one eager forward here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("8b" if cuda else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    budget = args.max_batch_tokens or (16384 if cuda else 4096)
    reps = args.reps or (10 if cuda else 3)
    n = args.rows or (2000 if cuda else 200)

    peak = rmbench.matmul_peak(args.device, dtype)
    bandwidth = rmbench.copy_bandwidth(args.device)
    tokenizer = rmbench.load_tokenizer() or rmbench.fallback_tokenizer()
    cfg = rmbench.llama_config(shape, args.family, args.layers)
    model = rmbench.random_model(cfg, args.device, dtype)
    engine = rmbench.make_engine(model, tokenizer, max_batch_tokens=budget, share_prefix=False)
    work = rmbench.workload(n, gating=rmbench.gating_pattern(tokenizer))
    batch, lengths = steady_batch(engine, work.samples)
    print(f"matmul peak {peak / 1e12:.1f} TFLOP/s, copy {bandwidth / 1e9:.0f} GB/s; {work.source}; batch of "
          f"{len(lengths)} samples, {sum(lengths)} tokens (budget {engine.config.max_batch_tokens}); "
          f"attention {engine.attention}, kernels {engine.config.kernels}", file=sys.stderr)

    eager_ms = median_ms(lambda: engine.forward_eager(batch), args.device, reps)
    graph_ms = median_ms(lambda: engine.forward(batch), args.device, reps) if engine.graphs is not None else None
    gaps = host_gaps(engine, work.samples[:args.stream_rows or n], args.device)
    parts = breakdown(engine, batch, lengths, cfg, peak, bandwidth, reps, args.device)
    if args.trace:
        write_trace(engine, batch, args.trace)

    print()
    print_breakdown(parts)
    print(f"\nsame batch without timers: eager {eager_ms:.2f} ms"
          + ("" if graph_ms is None else f", CUDA graph {graph_ms:.2f} ms")
          + f"; compute floor {parts['compute_floor_ms']:.2f} ms")
    print(f"stream of {gaps['batches']} batches: device busy {gaps['busy_ms']:.0f} ms of {gaps['device_span_ms']:.0f} ms, "
          f"gaps {gaps['gap_ms']:.1f} ms ({100 * (gaps['idle_share'] or 0):.1f}%), largest {gaps['largest_gap_ms']} ms; "
          f"wall {gaps['wall_ms']:.0f} ms")
    env = rmbench.environment(args.device)
    print(f"{env['device']}, {env['date']}, commit {env['commit']}, torch {env['torch']}; shape {shape}, {dtype}, "
          f"{args.family}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "shape": shape, "layers": args.layers, "dtype": str(dtype), "family": args.family,
                       "workload": work.source, "matmul_peak_tflops": round(peak / 1e12, 3),
                       "copy_gbs": round(bandwidth / 1e9, 1), "batch_samples": len(lengths),
                       "batch_tokens": sum(lengths), "eager_ms": round(eager_ms, 3),
                       "graph_ms": None if graph_ms is None else round(graph_ms, 3),
                       "breakdown": parts, "stream": gaps}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
