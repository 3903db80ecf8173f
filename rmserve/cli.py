"""The `rmserve` command line."""
from __future__ import annotations

import argparse
import sys

from .eval.cli import add_parser as add_eval_parser
from .flags import (HelpFormatter, add_engine_flags, add_kernel_flags, add_model_flag, add_output_flags,
                    add_quantization_flags, add_step_flags, engine_settings)
from .server.main import add_parser as add_serve_parser


def _score(args: argparse.Namespace) -> int:
    """The offline job (rmserve/offline/): exit 0 all rows scored, 3 some rows bad (see the errors
    file), 2 refused (bad arguments, unreadable input, a resume that would mix two jobs)."""
    from .device_check import check_device
    from .engine import EngineConfig
    from .offline import EXIT_REFUSED, JobConfig, ResumeError, ShapeConfig, SourceError, run_job, run_ray_job

    try:
        check_device(args.device)
        shape = ShapeConfig(shape=args.shape, id_field=args.id_field, messages_field=args.messages_field,
                            prompt_field=args.prompt_field, response_field=args.response_field,
                            responses_field=args.responses_field, chosen_field=args.chosen_field,
                            rejected_field=args.rejected_field, group_field=args.group_field,
                            keep=tuple(k for k in (args.keep or "").split(",") if k))
        engine = EngineConfig(**engine_settings(args), share_prefix=not args.no_share_prefix)
        config = JobConfig(args.input, args.output, args.model, format=args.format, split=args.split,
                           shape=shape, engine=engine, part_rows=args.part_rows, samples=args.samples,
                           seed=args.seed, quiet=args.quiet,
                           overwrite=args.overwrite)
        if args.ray is None:
            summary = run_job(config)
        else:
            try:
                import ray  # noqa: F401
            except ModuleNotFoundError:
                print('rmserve score: --ray needs Ray; install it with: pip install -e ".[ray]"', file=sys.stderr)
                return EXIT_REFUSED
            summary = run_ray_job(config, address=args.ray or None, actors=args.actors,
                                  actor_cpus=args.actor_cpus, actor_gpus=args.actor_gpus)
    except (ResumeError, SourceError, ValueError) as e:
        print(f"rmserve score: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:   # Ctrl-C: committed parts stay; say how to go on rather than a traceback
        print(f"\nrmserve score: interrupted; the committed parts are kept in {args.output}.parts/, "
              "rerun the same command to finish the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    from .offline.job import report

    report(summary, args.quiet)
    return summary["exit_code"]


EXIT_INTERRUPTED = 130   # the shell's code for a job stopped by Ctrl-C (128 + SIGINT)


def _add_score(sub) -> None:
    s = sub.add_parser("score", help="score a file of conversations (resumable; --ray for a cluster)",
                       description="Score every row of a file; rerun the same command to resume.",
                       formatter_class=HelpFormatter)
    s.add_argument("input", help=".jsonl, .jsonl.gz, .parquet, a datasets directory, or hf:<name>[:<split>]")
    add_model_flag(s)
    add_output_flags(s, "the output file: .parquet, or .jsonl/.json/.ndjson (or any name with --format), in an "
                        "existing directory; parts go to OUTPUT.parts/ meanwhile",
                     "split of a datasets directory or hub dataset (hub default: train)")
    g = s.add_argument_group("row shape")
    g.add_argument("--shape", default="auto", choices=["auto", "messages", "prompt_response", "pair", "multi"],
                   help="row shape (see README); auto: from the first well-formed row's columns")
    g.add_argument("--id-field", default="id", help="id column (when the first row lacks `id`: the row number)")
    g.add_argument("--messages-field", default="messages", help="messages shape: the message-list column")
    g.add_argument("--prompt-field", default="prompt", help="the prompt column (prompt_response, pair, multi)")
    g.add_argument("--response-field", default="response", help="prompt_response shape: the answer column")
    g.add_argument("--responses-field", default="responses", help="multi shape: the column of answers")
    g.add_argument("--chosen-field", default="chosen", help="pair shape: the chosen side's column")
    g.add_argument("--rejected-field", default="rejected", help="pair shape: the rejected side's column")
    g.add_argument("--group-field", default=None, help="prompt-id column: rank rows within each group (best-of-N)")
    g.add_argument("--keep", default=None, help="comma-separated input columns to copy to the output")
    e = s.add_argument_group("engine")
    add_engine_flags(e)
    e.add_argument("--max-batch-seqs", type=int, default=None, help="most samples in one batch (default: no cap)")
    e.add_argument("--no-share-prefix", action="store_true", help="score every sample whole (no shared prompts)")
    add_kernel_flags(e)
    add_quantization_flags(e)
    add_step_flags(e)
    j = s.add_argument_group("job")
    j.add_argument("--part-rows", type=int, default=2048, help="input rows per committed part")
    j.add_argument("--samples", type=int, default=0, help="URM/QRM: draws per sample (samples, score_samples)")
    j.add_argument("--seed", type=int, default=0, help="seed of the draws")
    j.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    j.add_argument("--overwrite", action="store_true", help="discard a previous job's parts and output")
    r = s.add_argument_group("ray")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run through Ray Data; ADDRESS of the cluster (default: RAY_ADDRESS or a local Ray)")
    r.add_argument("--actors", type=int, default=None, help="engine actors (default: one per GPU, else 1)")
    r.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per engine actor")
    r.add_argument("--actor-gpus", type=float, default=None, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    s.set_defaults(func=_score)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rmserve", description="Fast, exact reward-model inference")
    parser.add_argument("--version", action="version", version=f"rmserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score(sub)
    add_serve_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
