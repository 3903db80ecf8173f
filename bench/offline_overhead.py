"""The offline job's own overhead: `rmserve score`'s job (run_job) against Engine.score on the same rows.

    python bench/offline_overhead.py                      # CPU, small random model, 600 rows
    python bench/offline_overhead.py --rows 12075 --device cuda --hidden 4096 --layers 32 ...

Workload: the first --rows rows of ../shared/data/alpaca_eval_bon.jsonl.gz (best-of-15 answers to
AlpacaEval prompts), rendered with the real Llama 3 tokenizer and chat template. The model is random
(scores meaningless, the work real): a tiny checkpoint with the Llama 3 tokenizer files copied in
and vocab_size set to fit them (bench/prefix_sharing.py: build_checkpoint).

Both sides do the same scoring work: the same rows, the same engine settings, prompt ids as the
shared-prefix groups (the job's --group-field prompt_id; Engine.score(groups=...)).
- api: Engine.score(conversations, groups) on rows already parsed in memory, engine preloaded.
- job: run_job from the call to its return: fingerprint scan of the file, reading and parsing the
  gzip jsonl, row checks, tokenizing (one part ahead on a thread), scoring part by part, parquet
  parts with fsync and manifest commits, the final merge with best-of-N ranks, the summary; its
  engine load included.
Overhead = job / api - 1: of the wall-time medians, of the fastest runs, and of the CPU time this
process used (all threads; the least disturbed by other load on a shared machine), over --repeats
alternated runs. One JSON row goes to --json.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prefix_sharing import DATA, build_checkpoint  # noqa: E402

from rmserve import Engine, EngineConfig  # noqa: E402
from rmserve.offline import JobConfig, ShapeConfig, run_job  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(DATA, "alpaca_eval_bon.jsonl.gz"))
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--family", default="bt")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--part-rows", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "offline_overhead.jsonl"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = tempfile.mkdtemp(prefix="rmserve-offline-bench-")
    model = build_checkpoint(os.path.join(work, "model"), args.family, args.hidden, args.layers, args.heads,
                             args.kv_heads, args.intermediate, os.path.join(DATA, "llama3-tokenizer"))
    inp = os.path.join(work, "rows.jsonl.gz")
    convs, groups = [], []
    with gzip.open(args.data, "rt", encoding="utf-8") as src, gzip.open(inp, "wt", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= args.rows:
                break
            dst.write(line)
            row = json.loads(line)
            convs.append(row["messages"])
            groups.append(row["prompt_id"])
    settings = EngineConfig(dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens)

    engine = Engine.from_pretrained(model, **asdict(settings))
    engine.score(convs[:32], groups[:32])   # warm-up
    api_s, job_s, api_cpu, job_cpu, tokens, summary = [], [], [], [], 0, {}
    for r in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        results = engine.score(convs, groups)
        api_s.append(time.perf_counter() - t)
        api_cpu.append(time.process_time() - c)
        tokens = sum(x.num_tokens for x in results)
        out = os.path.join(work, f"scores-{r}.parquet")
        t, c = time.perf_counter(), time.process_time()
        summary = run_job(JobConfig(inp, out, model, engine=settings, part_rows=args.part_rows, quiet=True,
                                    shape=ShapeConfig(group_field="prompt_id")))
        job_s.append(time.perf_counter() - t)
        job_cpu.append(time.process_time() - c)
        assert summary["tokens"] == tokens and summary["scored"] == len(convs), summary
        print(f"repeat {r}: api {api_s[-1]:.2f} s ({api_cpu[-1]:.2f} s CPU), job {job_s[-1]:.2f} s "
              f"({job_cpu[-1]:.2f} s CPU)", flush=True)
    api, job = statistics.median(api_s), statistics.median(job_s)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    row = {"bench": "offline_overhead", "rows": len(convs), "tokens": tokens, "family": args.family,
           "model": f"h{args.hidden}-l{args.layers}-i{args.intermediate}", "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "max_batch_tokens": args.max_batch_tokens,
           "part_rows": args.part_rows, "api_s": api_s, "job_s": job_s,
           "api_rows_per_s": len(convs) / api, "api_tokens_per_s": tokens / api,
           "job_rows_per_s": len(convs) / job, "job_tokens_per_s": tokens / job,
           "overhead": job / api - 1, "overhead_min": min(job_s) / min(api_s) - 1,
           "api_cpu_s": api_cpu, "job_cpu_s": job_cpu,
           "overhead_cpu": statistics.median(job_cpu) / statistics.median(api_cpu) - 1, "commit": commit}
    print(f"{len(convs)} rows, {tokens} tokens (Llama 3 tokenizer), model {row['model']} on {args.device}, "
          f"{row['threads']} threads")
    print(f"api: {row['api_rows_per_s']:.1f} rows/s, {row['api_tokens_per_s']:.0f} tokens/s (median {api:.2f} s)")
    print(f"job: {row['job_rows_per_s']:.1f} rows/s, {row['job_tokens_per_s']:.0f} tokens/s (median {job:.2f} s)")
    print(f"job overhead: {100 * row['overhead']:+.1f}% of the medians, {100 * row['overhead_min']:+.1f}% of the "
          "fastest runs (on a busy machine the fastest runs are the least disturbed)")
    print(f"job overhead in CPU time (this process, all threads): {100 * row['overhead_cpu']:+.1f}%")
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
