"""Command-line flags shared by the `rmserve` subcommands: their help, defaults and choices.

Importing this is cheap (no torch), so `rmserve --help` answers at once. The choice lists repeat
the engine's (EngineConfig checks a value, with a one-line error naming the choices; argparse
would print its usage instead); tests/test_cli.py checks that they agree.
"""
from __future__ import annotations

import argparse

from .inputs import TEMPLATE_DATE   # cheap: no torch
from .steps import AGGREGATIONS, DEFAULT_AGGREGATION, unescape

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")   # engine.DTYPES + auto
ATTENTION = ("auto", "flash_attn", "torch_varlen", "reference")               # model/attention.BACKENDS + auto
KERNELS = ("auto", "triton", "torch")                                        # kernels/dispatch.KERNEL_CHOICES
BOS = ("one", "template", "tokenizer")                                       # inputs.BOS_POLICIES
QUANTIZATION = ("fp8",)                                                      # model/fp8.QUANTIZATIONS
QUANT_KERNELS = ("auto", "csrc", "torch")                                    # kernels/fp8_quant.FP8_KERNEL_CHOICES


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to each flag's help, unless it has no default or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def engine_settings(args: argparse.Namespace) -> dict:
    """The EngineConfig settings among parsed flags: every flag the add_*_flags functions here add is
    named after the EngineConfig field it sets (--max-batch-tokens -> max_batch_tokens), so a
    subcommand passes what it parsed as EngineConfig(**engine_settings(args)) and a new flag needs no
    second list to reach the engine."""
    from dataclasses import fields

    from .engine import EngineConfig

    names = {f.name for f in fields(EngineConfig)}
    return {name: value for name, value in vars(args).items() if name in names}


def add_model_flag(parser) -> None:
    """--model, the same for every subcommand that loads one."""
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id, or tiny:<preset> (see README)")


def add_output_flags(parser, output_help: str, split_help: str) -> None:
    """--output, --format and --split, the same for the jobs that read a dataset and write scores."""
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--format", choices=["parquet", "jsonl"], default=None,
                        help="output format (default: from the --output name)")
    parser.add_argument("--split", default=None, help=split_help)


def add_engine_flags(group, bos_note: str | None = None) -> None:
    """The engine settings every subcommand that loads a model takes (EngineConfig fields).
    bos_note: what the subcommand adds to --bos's help."""
    group.add_argument("--dtype", default="auto", metavar="DTYPE",
                       help=f"model dtype: {', '.join(DTYPES)}; auto is bfloat16 on CUDA, float32 on the CPU")
    group.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda when this machine has it, else cpu)")
    group.add_argument("--bos", default="one", choices=BOS,
                       help="BOS policy: exactly one BOS (one), the rendered template's own (template), or the "
                            "tokenizer's added to it (tokenizer); see README 'Tokenization and BOS'"
                            + (f"; {bos_note}" if bos_note else ""))
    group.add_argument("--max-length", type=int, default=None,
                       help="longest sample in tokens; longer ones get an error (default: the model's maximum)")
    group.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget of one packed batch")
    group.add_argument("--template-date", default=TEMPLATE_DATE, metavar="YYYY-MM-DD",
                       help="'today' for chat templates that render the date, so a score never depends on the day "
                            "it was computed (README 'Tokenization and BOS')")


def add_kernel_flags(group) -> None:
    """The implementation choices (EngineConfig.attention and .kernels)."""
    group.add_argument("--attention", default="auto", metavar="BACKEND",
                       help=f"attention backend: {', '.join(ATTENTION)}; auto: the first this device and dtype "
                            "can run, in that order (reference on the CPU)")
    group.add_argument("--kernels", default="auto", choices=KERNELS,
                       help="fused Triton kernels (triton), the PyTorch references (torch), or auto: the kernels "
                            "on CUDA, the references elsewhere")


def add_quantization_flags(group) -> None:
    """--quantization and --quant-kernels (EngineConfig.quantization and .quant_kernels)."""
    group.add_argument("--quantization", default=None, choices=QUANTIZATION,
                       help="fp8: e4m3 weights (per channel) and activations (per token) in the backbone's linears, "
                            "bf16 elsewhere; needs sm_89+ on CUDA (README: FP8)")
    group.add_argument("--quant-kernels", default="auto", choices=QUANT_KERNELS,
                       help="fp8's quantizing ops: the csrc CUDA kernels (auto: on CUDA when built) or the references")


def add_step_flags(group) -> None:
    """Process reward models' settings (EngineConfig.step_aggregation and .step_separator)."""
    group.add_argument("--step-aggregation", default=DEFAULT_AGGREGATION, choices=list(AGGREGATIONS),
                       help="process reward models: how `score` comes from the step rewards (README: process "
                            "reward models)")
    group.add_argument("--step-separator", default=None, type=unescape, metavar="TEXT",
                       help="process reward models: split text answers into steps on TEXT (backslash escapes "
                            "\\n, \\t read as such, e.g. '\\n\\n'); without it an answer is a list of steps "
                            "or already joined with the step token")
