"""The offline scoring job in one process: stream the input in parts, score, commit, merge.

    from rmserve.offline import JobConfig, run_job
    summary = run_job(JobConfig("data.jsonl.gz", "scores.parquet", "RLHFlow/ArmoRM-Llama3-8B-v0.1"))

Parts are fixed row ranges (`part_rows` rows each), so a rerun cuts the input the same way; each
part is also the reordering window of length packing (the engine packs its samples by length) and
of shared-prefix scoring. A tokenizer thread encodes the next part while the engine scores this
one, so memory stays bounded by two parts whatever the input size.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from ..engine import EngineConfig
from .parts import PartStore, ResumeError, check_output, output_format
from .scoring import build_outputs, check_columns, encode_rows, score_samples
from .shapes import ShapeConfig, make_row, parse_raw, resolve
from .sources import Source, SourceError, open_source

EXIT_OK = 0
EXIT_BAD_ROWS = 3      # the job finished; some rows could not be scored (see the errors file)
EXIT_REFUSED = 2       # bad arguments, unreadable input, or a resume that would mix two jobs


@dataclass(frozen=True)
class JobConfig:
    input: str                                   # path, datasets directory, or hf:<name>[:<split>]
    output: str                                  # the final file; parts live in <output>.parts/
    model: str                                   # checkpoint dir, hub id, or tiny:<family>
    format: str | None = None                    # parquet | jsonl; None: from the output's suffix
    split: str | None = None                     # datasets split
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    part_rows: int = 2048                        # input rows per committed part (and packing window)
    samples: int = 0                             # URM/QRM: draws per sample into samples/score_samples
    seed: int = 0                                # the draws' seed (same seed, same draws)
    quiet: bool = False                          # no progress bar or notes
    overwrite: bool = False                      # discard a previous job's parts and output

    def __post_init__(self):
        if self.part_rows < 1:
            raise ValueError("part_rows must be at least 1")
        check_columns(self.shape)


def model_path(model: str) -> str:
    if model.startswith("tiny:"):
        from ..tiny import tiny_checkpoint

        return tiny_checkpoint(model[len("tiny:"):])
    from ..loader import resolve as resolve_model

    return resolve_model(model)


def model_identity(path: str) -> str:
    """Hash of the checkpoint's config and tokenizer files and its weight files' names and sizes."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
        elif name.endswith((".json", ".jinja")):
            with open(full, "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@dataclass
class Prepared:
    config: JobConfig
    source: Source
    shape: ShapeConfig           # resolved
    store: PartStore
    key: dict
    info: dict
    num_rows: int
    committed: dict[int, dict]
    model_dir: str
    done: dict | None = None     # the summary, when this exact job already finished

    @property
    def num_parts(self) -> int:
        return -(-self.num_rows // self.config.part_rows)

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, *exc) -> None:
        self.store.unlock()


def prepare(config: JobConfig, runner: str) -> Prepared:
    """Read the input once (rows, fingerprint), resolve the row shape and the model, open the parts."""
    from ..config import load_spec

    source = open_source(config.input, config.split)
    check_output(config.output)
    fmt = output_format(config.output, config.format)
    if os.path.exists(config.output) and os.path.exists(source.path) and os.path.samefile(source.path, config.output):
        raise SourceError(f"--output {config.output} is the input file; name another output")
    num_rows, fingerprint = source.scan()
    shape = resolve(config.shape, _first_object(source, config.shape.shape == "auto", num_rows))
    check_columns(shape)   # with the shape known: a pair job also writes chosen_*, rejected_*
    mdir = model_path(config.model)
    spec = load_spec(mdir)
    from ..sampling import check_sampling

    check_sampling(spec.family, config.samples, config.seed)
    key = {"input": fingerprint, "rows": num_rows, "model": config.model, "model_files": model_identity(mdir),
           "engine": asdict(config.engine), "shape": asdict(shape), "part_rows": config.part_rows,
           "samples": [config.samples, config.seed], "format": fmt, "runner": runner}
    key = json.loads(json.dumps(key, default=str))   # as the manifest stores it (tuples -> lists)
    info = {"input": config.input, "family": spec.family, "names": list(spec.head.names),
            "step_token": spec.head.step_token or None}
    store = PartStore(config.output, fmt)
    store.lock()   # held until the Prepared is closed (`with prepare(...) as prep`) or the process ends
    prep = Prepared(config, source, shape, store, key, info, num_rows, {}, mdir)
    try:
        if not config.overwrite:
            prep.done = store.finished(key)
            if prep.done is not None:
                return prep
        prep.committed = store.open(key, info, overwrite=config.overwrite)
    except BaseException:
        store.unlock()
        raise
    return prep


def _first_object(source: Source, needed: bool, num_rows: int) -> dict:
    """The first row that is a JSON object. `needed` (shape auto): with none, the shape cannot be
    told, which is refused with the reason rather than guessed."""
    first_error = None
    for raw in source.rows():
        try:
            return parse_raw(raw)
        except ValueError as e:   # a malformed row: its error is reported when the row's part is scored
            first_error = first_error or str(e)
    if needed and num_rows == 0:
        raise SourceError(f"{source.path} has no rows")
    if needed:   # often a .json file holding one JSON array
        raise SourceError(f"cannot tell the row shape: no row of {source.path} is a JSON object (row 0: "
                          f"{first_error}); the input must be JSON Lines, one object per line; pass --shape "
                          "to score it anyway and list every bad row in the errors file")
    return {}


def part_rows(prep: Prepared) -> Iterator[tuple[int, int, list]]:
    """(k, first row number, raw rows) for every part not yet committed, in input order."""
    n = prep.config.part_rows
    chunk: list = []
    for i, raw in enumerate(prep.source.rows()):
        k = i // n
        if k in prep.committed:
            continue
        chunk.append(raw)
        if len(chunk) == n or i == prep.num_rows - 1:
            yield k, k * n, chunk
            chunk = []
    if chunk:   # the input grew after the scan: its fingerprint will differ on the next run too
        raise ResumeError("the input changed while the job was reading it")


def announce(prep: Prepared) -> bool:
    """Says (unless quiet) that this exact job is already complete, or that it resumes; True when complete."""
    if prep.done is not None:
        if not prep.config.quiet:
            print(f"{prep.config.output} is already complete (same input, model and settings)", file=sys.stderr)
        return True
    if prep.committed and not prep.config.quiet:
        rows = sum(p["rows"] for p in prep.committed.values())
        print(f"resuming {prep.config.output}: {len(prep.committed)} of {prep.num_parts} parts ({rows} of "
              f"{prep.num_rows} rows) were committed by an earlier run; scoring the rest", file=sys.stderr)
    return False


def progress(prep: Prepared, quiet: bool, file=None):
    """The job's progress bar on `file` (default: stderr)."""
    from tqdm import tqdm

    done = sum(p["rows"] for p in prep.committed.values())
    return tqdm(total=prep.num_rows, initial=done, unit="row", disable=quiet, file=file or sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def summarize(prep: Prepared, seconds: float) -> dict:
    parts = prep.store.manifest["parts"].values()
    total = {k: sum(p[k] for p in parts) for k in ("rows", "scored", "errors", "tokens")}
    s: dict[str, Any] = {"input": prep.config.input, "output": prep.config.output,
                         "errors_file": prep.store.errors_path, "model": prep.config.model,
                         "family": prep.info["family"], "shape": prep.shape.shape, "names": prep.info["names"],
                         "template_date": prep.config.engine.template_date,
                         **_step_settings(prep),
                         **total, "seconds": round(seconds, 3),
                         "rows_per_s": total["rows"] / seconds if seconds else None,
                         "tokens_per_s": total["tokens"] / seconds if seconds else None}
    if prep.shape.shape == "pair":
        pairs = sum(p["pairs"] for p in parts)
        wins, ties = sum(p["chosen_wins"] for p in parts), sum(p["ties"] for p in parts)
        s.update(pairs=pairs, chosen_wins=wins, ties=ties, pair_accuracy=wins / pairs if pairs else None)
    if prep.shape.shape == "multi":
        g = sum(p["groups"] for p in parts)
        if g:
            best = sum(p["best_score_sum"] for p in parts) / g
            mean = sum(p["mean_score_sum"] for p in parts) / g
            s.update(groups=g, mean_group_size=sum(p["group_size_sum"] for p in parts) / g,
                     mean_best_score=best, mean_score=mean, mean_best_minus_mean=best - mean)
        else:
            s.update(groups=0)
    s["exit_code"] = EXIT_BAD_ROWS if total["errors"] else EXIT_OK
    return s


def _step_settings(prep: Prepared) -> dict:
    """A process reward model's step token, aggregation rule and separator (rmserve/steps.py)."""
    if not prep.info.get("step_token"):
        return {}
    engine = prep.config.engine
    return {"step_token": prep.info["step_token"], "step_aggregation": engine.step_aggregation,
            "step_separator": engine.step_separator}


def finish(prep: Prepared, seconds: float) -> dict:
    if len(prep.store.manifest["parts"]) != prep.num_parts:
        raise RuntimeError("not every part was committed")   # a bug, not a user error
    summary = summarize(prep, seconds)
    return prep.store.finalize(summary, prep.shape.group_field)


def report(summary: dict, quiet: bool) -> None:
    errors = summary["errors"]
    line = (f"{summary['scored']} of {summary['rows']} rows scored, {errors} error{'' if errors == 1 else 's'}, "
            f"{summary['tokens']} tokens")
    if summary.get("tokens_per_s"):
        line += f", {summary['rows_per_s']:.1f} rows/s, {summary['tokens_per_s']:.0f} tokens/s"
    if summary.get("pair_accuracy") is not None:
        line += f", pair accuracy {summary['pair_accuracy']:.4f}"
    if summary.get("groups"):
        line += f", {summary['groups']} best-of-N groups"
    print(line + f" -> {summary['output']}", file=sys.stderr)
    if summary["errors"]:
        print(f"bad rows are listed in {summary['errors_file']}", file=sys.stderr)
    if not quiet:
        print(f"summary: {summary['output']}.summary.json", file=sys.stderr)


def run_job(config: JobConfig) -> dict:
    """Runs (or resumes, or finds finished) the job; returns its summary (see `exit_code`)."""
    with prepare(config, "local") as prep:
        if announce(prep):
            return prep.done
        from ..engine import Engine

        if config.model.startswith("tiny:") and not config.quiet:
            print(f"note: {config.model} has random weights; its scores are meaningless", file=sys.stderr)
        try:
            engine = Engine.from_pretrained(prep.model_dir, **asdict(config.engine))
        except BaseException:
            # Nothing scored yet: leave no manifest behind that would refuse the corrected command.
            if not prep.committed:
                prep.store.discard_if_empty()
            raise
        start, before = time.perf_counter(), prep.store.manifest["seconds"]
        bar = progress(prep, config.quiet)
        tokens = 0
        parts = part_rows(prep)

        def encode_next():   # runs on the tokenizer thread: one part ahead of the device
            nxt = next(parts, None)
            if nxt is None:
                return None
            k, first, raws = nxt
            return k, first, len(raws), encode_rows(engine.encode, [make_row(prep.shape, first + j, raw)
                                                                   for j, raw in enumerate(raws)])

        try:
            with ThreadPoolExecutor(1, thread_name_prefix="rmserve-tokenize") as pool:
                ahead = pool.submit(encode_next)
                while (got := ahead.result()) is not None:
                    ahead = pool.submit(encode_next)
                    k, first, n, enc = got
                    results = score_samples(engine, enc.encoded, enc.groups, config.samples, config.seed)
                    out = build_outputs(prep.shape, enc, results, first, n)
                    prep.store.write_part(k, out.records, out.errors)
                    prep.store.commit(k, out.stats, before + time.perf_counter() - start)
                    tokens += out.stats["tokens"]
                    bar.update(n)
                    bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)
        finally:
            bar.close()
        return finish(prep, before + time.perf_counter() - start)
