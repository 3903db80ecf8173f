"""`rmserve eval rewardbench|rewardbench2`: the benchmark as one offline job, then its official scores."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    from ..flags import HelpFormatter, add_engine_flags, add_kernel_flags, add_model_flag, add_output_flags

    e = sub.add_parser("eval", help="run a reward-model benchmark (RewardBench, RewardBench 2)",
                       description="Score a benchmark as one resumable offline job and print its official scores.")
    benches = e.add_subparsers(dest="benchmark", required=True)
    for name, title, hub in (("rewardbench", "RewardBench (v1)", "hf:allenai/reward-bench (split filtered)"),
                             ("rewardbench2", "RewardBench 2", "hf:allenai/reward-bench-2 (split test)")):
        b = benches.add_parser(name, help=f"{title}: per-subset accuracy and the leaderboard scores",
                               description=f"{title}. Rerun the same command to resume an interrupted run.",
                               formatter_class=HelpFormatter)
        b.add_argument("input", nargs="?", default=None,
                       help=f".jsonl, .parquet, a datasets directory or hf:<name>[:<split>] (default: {hub})")
        add_model_flag(b)
        add_output_flags(b, "per-row scores: .parquet, or .jsonl (or any name with --format), in an existing "
                            "directory; OUTPUT.results.json beside it",
                         "split of a datasets directory or hub dataset")
        g = b.add_argument_group("engine")
        add_engine_flags(g, bos_note="the official runner's transformers pipeline is 'tokenizer'")
        add_kernel_flags(g)
        j = b.add_argument_group("job")
        j.add_argument("--part-rows", type=int, default=2048, help="input rows per committed part")
        j.add_argument("--quiet", action="store_true", help="no progress bar")
        j.add_argument("--overwrite", action="store_true", help="discard a previous run's parts and output")
        b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device_check import check_device
    from ..engine import EngineConfig
    from ..flags import engine_settings
    from ..offline import EXIT_REFUSED, ResumeError, SourceError
    from .job import EvalConfig, report, run_eval

    try:
        check_device(args.device)
        engine = EngineConfig(**engine_settings(args))
        config = EvalConfig(args.benchmark, args.output, args.model, input=args.input, split=args.split,
                            format=args.format, engine=engine, part_rows=args.part_rows, quiet=args.quiet,
                            overwrite=args.overwrite)
        results = run_eval(config)
    except (ResumeError, SourceError, ValueError) as e:
        print(f"rmserve eval {args.benchmark}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"\nrmserve eval {args.benchmark}: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130
    report(results, args.output)
    return results["exit_code"]
