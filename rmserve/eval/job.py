"""`rmserve eval rewardbench|rewardbench2`: one offline scoring job, then the official scores.

1. The benchmark's rows are read from the input (jsonl, parquet, a `save_to_disk` directory or
   hf:<name>[:<split>]) and written, in order, as the offline job's rows to OUTPUT.input.jsonl:
   RewardBench as `pair` rows (the chosen and rejected answers of a prompt share it), RewardBench 2
   as `multi` rows (chosen + rejected, one shared prompt). A row that is not a benchmark row is
   written without its answers, so the job lists it in OUTPUT.errors.jsonl (the reason is put in).
2. `run_job` scores it: resumable parts, the errors file, the summary; rerun the same command to
   finish an interrupted run, or to find a finished one.
3. The official per-subset and section / overall scores are computed from OUTPUT, printed, and
   written to OUTPUT.results.json; OUTPUT.input.jsonl is removed.
Rows that could not be scored are left out of the scores, which are then marked incomplete.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from ..engine import EngineConfig
from ..offline import JobConfig, ShapeConfig, run_job
from ..offline.parts import atomic_write, check_output, output_format
from ..offline.shapes import parse_raw
from ..offline.sources import open_source
from . import rewardbench as rb1
from . import rewardbench2 as rb2


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    default_input: str          # the official dataset on the hub
    default_split: str          # its split, used for hf: inputs that name none
    shape: ShapeConfig          # the offline job's row shape for the normalized rows
    normalize: Callable         # (row dict, row number) -> normalized row, or RowProblem
    problem: type               # the RowProblem class of `normalize`


BENCHMARKS = {
    "rewardbench": Benchmark("rewardbench", "RewardBench", "hf:allenai/reward-bench", "filtered",
                             ShapeConfig(shape="pair", keep=("subset",)), rb1.normalize, rb1.RowProblem),
    "rewardbench2": Benchmark("rewardbench2", "RewardBench 2", "hf:allenai/reward-bench-2", "test",
                              ShapeConfig(shape="multi", keep=("subset", "num_correct")), rb2.normalize,
                              rb2.RowProblem),
}


@dataclass(frozen=True)
class EvalConfig:
    benchmark: str                               # rewardbench | rewardbench2
    output: str                                  # per-row scores; OUTPUT.results.json beside it
    model: str
    input: str | None = None                     # None: the official dataset on the hub
    split: str | None = None
    format: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    part_rows: int = 2048
    quiet: bool = False
    overwrite: bool = False


def write_job_input(bench: Benchmark, config: EvalConfig, path: str) -> dict[int, str]:
    """Normalized rows -> `path` (jsonl, atomically); returns {row number: reason} of rows that are not
    benchmark rows."""
    spec = config.input or bench.default_input
    split = config.split
    if spec.startswith("hf:") and split is None and ":" not in spec[3:]:
        split = bench.default_split
    source = open_source(spec, split)
    source.scan()   # the offline job's checks of the whole input (a cut .gz, ...): refused, not a traceback
    problems: dict[int, str] = {}

    def write(f):
        for i, raw in enumerate(source.rows()):
            try:
                row = parse_raw(raw)
            except ValueError as e:
                problems[i] = str(e)
                row = {"id": i}
            try:
                out = bench.normalize(row, i)
            except bench.problem as e:
                problems[i] = str(e)
                out = {"id": row.get("id", i)}
            f.write(json.dumps(out, ensure_ascii=False).encode() + b"\n")

    atomic_write(path, write)
    return problems


def _note_problems(errors_path: str, problems: dict[int, str]) -> None:
    """Puts the benchmark's reason for each malformed row into the job's errors file."""
    if not problems or not os.path.exists(errors_path):
        return
    with open(errors_path, encoding="utf-8") as f:
        errors = [json.loads(line) for line in f if line.strip()]
    for e in errors:
        if e["row"] in problems:
            e["error"] = problems[e["row"]]
    atomic_write(errors_path, lambda f: f.write(b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n"
                                                         for e in errors)))


def read_records(output: str, fmt: str) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(output).to_pylist()
    with open(output, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def official_scores(bench: Benchmark, records: list[dict]) -> dict:
    if bench.name == "rewardbench":
        subsets = rb1.subset_accuracies(records)
        board = rb1.leaderboard({s: v["accuracy"] for s, v in subsets.items()})
        missing = [s for s in rb1.CORE_SUBSETS if s not in subsets]
        return {"subsets": subsets, **board, "missing_subsets": missing}
    subsets = rb2.subset_scores(records)
    return {"subsets": subsets, "Score": rb2.overall(subsets),
            "missing_subsets": [s for s in rb2.SUBSETS if s not in subsets]}


def run_eval(config: EvalConfig) -> dict:
    """Scores the benchmark as one offline job and returns the results (see `exit_code`)."""
    bench = BENCHMARKS[config.benchmark]
    check_output(config.output)
    fmt = output_format(config.output, config.format)
    job_input = config.output + ".input.jsonl"
    problems = write_job_input(bench, config, job_input)
    summary = run_job(JobConfig(job_input, config.output, config.model, format=fmt, shape=bench.shape,
                                engine=config.engine, part_rows=config.part_rows, quiet=config.quiet,
                                overwrite=config.overwrite))
    _note_problems(summary["errors_file"], problems)
    results = {"benchmark": bench.name, "model": config.model, "input": config.input or bench.default_input,
               "bos": config.engine.bos, "rows": summary["rows"], "scored": summary["scored"],
               "errors": summary["errors"], "errors_file": summary["errors_file"],
               **official_scores(bench, read_records(config.output, fmt))}
    results["complete"] = not results["errors"] and not results["missing_subsets"]
    results["exit_code"] = summary["exit_code"]
    data = json.dumps(_json_safe(results), indent=1).encode()
    atomic_write(config.output + ".results.json", lambda f: f.write(data))
    os.remove(job_input)
    return results


def _json_safe(value):
    """NaN (a part the official code leaves NaN) -> null, so the file is valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def report(results: dict, output: str, file=None) -> None:
    """The per-subset lines the official scripts print, then the leaderboard row (x100)."""
    file = file or sys.stdout
    bench = BENCHMARKS[results["benchmark"]]
    print(f"{bench.title}: {results['model']} on {results['input']}, {results['scored']} of {results['rows']} "
          f"rows scored", file=file)
    for name, s in results["subsets"].items():
        if "correct" in s:
            value = s.get("accuracy", s.get("score"))
            print(f"  {name}: {s['correct']:g}/{s['total']} ({value})", file=file)
        else:
            print(f"  {name}: {s['score']} over {s['prompts']} prompts", file=file)
    if bench.name == "rewardbench":
        columns = {"Score": results["Score"], **results["sections"], rb1.PRIOR: results[rb1.PRIOR]}
    else:
        columns = {"Score": results["Score"], **{s: results["subsets"].get(s, {}).get("score") for s in rb2.SUBSETS}}
    print(" | ".join(columns), file=file)
    print(" | ".join(_pct(v).rjust(len(k)) for k, v in columns.items()), file=file)
    if not results["complete"]:
        why = []
        if results["errors"]:
            why.append(f"{results['errors']} rows could not be scored (see {results['errors_file']})")
        if results["missing_subsets"]:
            why.append(f"subsets absent from the input: {', '.join(results['missing_subsets'])}")
        print("incomplete, not comparable with the leaderboard: " + "; ".join(why), file=file)
    print(f"results: {output}.results.json", file=file)
