"""Committed parts and the manifest: what makes the job resumable and lossless.

While a job runs, `<output>.parts/` holds
    manifest.json            the job's key (input fingerprint, model, settings) and committed parts
    part-000012.parquet      output rows of part 12 (rows 12*part_rows ... ), or .jsonl
    errors-000012.jsonl      that part's bad rows
    ray.log                  (a Ray job) what Ray printed while it ran (ray_job.py)
Every file is written to a temporary name, fsynced, then renamed into place, and the directory
fsynced; a part counts only once the manifest (written the same way) lists it. A job killed at any
moment leaves at worst an uncommitted part file, which the rerun writes again from the same rows
with the same batches, so the values are the same as an unbroken run's.

At the end the parts are merged, in input order, into the single output file; bad rows go to
`<output>.errors.jsonl` and the summary to `<output>.summary.json` (written last); then the parts
directory is removed. A rerun after that finds the summary and does nothing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable

MANIFEST_VERSION = 1


class ResumeError(RuntimeError):
    """The existing parts or output belong to a different job: refused rather than mixed."""


class OutputError(ValueError):
    """The output cannot be written where it was asked for."""


def check_output(output: str) -> None:
    """Refuses, before any work, an output that is a directory, in a directory that does not exist
    (a typo in a path: nothing is created silently), or where nothing can be written."""
    if os.path.isdir(output):
        raise OutputError(f"--output {output} is a directory; name the output file, e.g. "
                          f"{os.path.join(output, 'scores.parquet')}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.lexists(parent):
        raise OutputError(f"--output {output}: the directory {parent} does not exist; create it first "
                          f"(mkdir -p {parent}) or correct the path")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise OutputError(f"cannot write the output in {parent}: {e.strerror or e}") from None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """write(f) fills a binary file object; the file appears at `path` complete or not at all."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # failed or interrupted: no half-written file left beside the output
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def _jsonl_bytes(records: Iterable[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n" for r in records)


def key_hash(key: dict) -> str:
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


OUTPUT_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def output_format(output: str, fmt: str | None) -> str:
    """The output's format: --format, else from its name (.parquet; .jsonl, .json, .ndjson). A name
    that says neither (scores.csv would get parquet bytes), or that says the other one, is refused
    rather than guessed."""
    suffix = os.path.splitext(output)[1].lower()
    if fmt:
        if fmt not in ("parquet", "jsonl"):
            raise OutputError(f"--format must be parquet or jsonl, got {fmt!r}")
        if OUTPUT_SUFFIXES.get(suffix, fmt) != fmt:
            raise OutputError(f"--output {output} is named as {OUTPUT_SUFFIXES[suffix]} but --format {fmt} was "
                              "asked for; rename the output or drop --format")
        return fmt
    if suffix not in OUTPUT_SUFFIXES:
        raise OutputError(f"--output {output}: cannot tell the format from its name; name it .parquet or .jsonl "
                          "(.json, .ndjson), or pass --format parquet|jsonl to write that format under this name")
    return OUTPUT_SUFFIXES[suffix]


class PartStore:
    def __init__(self, output: str, fmt: str):
        self.output = output
        self.fmt = fmt
        self.dir = output + ".parts"
        self.manifest_path = os.path.join(self.dir, "manifest.json")
        self.errors_path = output + ".errors.jsonl"
        self.summary_path = output + ".summary.json"
        self.lock_path = output + ".lock"
        self.manifest: dict = {}
        self._lock_fd: int | None = None

    # ---- one run at a time ----
    def lock(self) -> None:
        """An exclusive lock on OUTPUT.lock, so two runs of a job never write one output at once.
        The OS releases it when the process ends, however it ends (SIGKILL included)."""
        import fcntl

        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResumeError(f"another rmserve run is writing {self.output} (it holds {self.lock_path}); "
                              "wait for it to finish or stop it, then rerun") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Releases the lock; the lock file goes too once no parts directory is left to guard."""
        if self._lock_fd is None:
            return
        if not os.path.isdir(self.dir) and os.path.exists(self.lock_path):
            os.remove(self.lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- paths ----
    def part_path(self, k: int) -> str:
        return os.path.join(self.dir, f"part-{k:06d}.{self.fmt}")

    def errors_part(self, k: int) -> str:
        return os.path.join(self.dir, f"errors-{k:06d}.jsonl")

    def stage_path(self, k: int) -> str:
        """Raw input rows of part k, staged for Ray workers."""
        return os.path.join(self.dir, f"input-{k:06d}.pkl")

    # ---- starting or resuming ----
    def finished(self, key: dict) -> dict | None:
        """The summary of this exact job if it already ran to the end, else None.

        The summary is written after the merged output and before the parts directory is removed,
        so a summary of this job means the output is complete; a parts directory still beside it is
        what a kill during that last removal left (some part files gone, the manifest maybe not),
        and is removed now rather than resumed from."""
        if not os.path.exists(self.summary_path):
            return None
        with open(self.summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("key_hash") == key_hash(key) and os.path.exists(self.output):
            shutil.rmtree(self.dir, ignore_errors=True)
            return summary
        return None

    def open(self, key: dict, info: dict, overwrite: bool = False) -> dict[int, dict]:
        """Start or resume the job `key`; returns the committed parts {k: stats}."""
        if overwrite:
            self.remove_all()
        if os.path.exists(self.manifest_path):
            with open(self.manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            _check_same(manifest.get("key", {}), key, self.dir)
            self.manifest = manifest
            return {int(k): v for k, v in manifest["parts"].items()}
        for path in (self.output, self.summary_path):
            if os.path.exists(path):
                summary = self._summary()
                if path == self.summary_path and summary.get("key_hash") == key_hash(key):
                    raise ResumeError(f"{self.output} is gone but {path} of this same finished job is left; "
                                      "pass --overwrite (or remove it) to score again")
                if "key" in summary:   # a finished job: name what differs, as a refused resume does
                    why = _what_differs(summary["key"], key)
                else:
                    why = "different input, model or settings" if summary else "not written by this job"
                raise ResumeError(f"{path} exists from another job ({why}); remove it, choose another --output, "
                                  "or pass --overwrite")
        os.makedirs(self.dir, exist_ok=True)
        self.manifest = {"version": MANIFEST_VERSION, "key": key, "key_hash": key_hash(key), "info": info,
                         "parts": {}, "seconds": 0.0}
        write_json(self.manifest_path, self.manifest)
        return {}

    def _summary(self) -> dict:
        """The summary beside the output ({} when there is none or it cannot be read)."""
        try:
            with open(self.summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def discard_if_empty(self) -> None:
        """Removes the parts directory when no part is committed (a job that failed to start)."""
        if not self.manifest.get("parts"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for path in (self.output, self.errors_path, self.summary_path):
            if os.path.exists(path):
                os.remove(path)

    # ---- writing and committing parts ----
    def write_part(self, k: int, records: list[dict], errors: list[dict]) -> None:
        """Writes part k's files (safe to call from a worker; commit() records it)."""
        if records:
            if self.fmt == "parquet":
                atomic_write(self.part_path(k), lambda f: _write_parquet(f, records))
            else:
                data = _jsonl_bytes(records)
                atomic_write(self.part_path(k), lambda f: f.write(data))
        elif os.path.exists(self.part_path(k)):
            os.remove(self.part_path(k))
        data = _jsonl_bytes(errors)
        atomic_write(self.errors_part(k), lambda f: f.write(data))

    def commit(self, k: int, stats: dict, seconds: float) -> None:
        """Records part k as done; `seconds`: the job's wall time so far, all runs together."""
        self.manifest["parts"][str(k)] = stats
        self.manifest["seconds"] = seconds
        write_json(self.manifest_path, self.manifest)

    # ---- the end ----
    def _remove_stale_temps(self) -> None:
        """Temporary files of the output, errors file or summary that a killed run left beside the
        output (the parts' go with the parts directory). Only this run writes them: it holds the lock."""
        for path in (self.output, self.errors_path, self.summary_path):
            for stale in glob.glob(glob.escape(path) + ".tmp-*"):
                os.remove(stale)

    def finalize(self, summary: dict, rank_by: str | None) -> dict:
        """Merges committed parts into the output (adding `rank` within `rank_by` groups), writes the
        errors file and the summary, removes the parts directory. Returns the summary."""
        self._remove_stale_temps()
        parts = sorted(int(k) for k in self.manifest["parts"])
        data_parts = [k for k in parts if self.manifest["parts"][str(k)]["scored"]]
        ranks = None
        if rank_by is not None:
            ranks, group_stats = _group_ranks([self.part_path(k) for k in data_parts], self.fmt, rank_by)
            summary.update(group_stats)
        if self.fmt == "parquet":
            atomic_write(self.output, lambda f: _merge_parquet(f, [self.part_path(k) for k in data_parts], ranks))
        else:
            atomic_write(self.output, lambda f: _merge_jsonl(f, [self.part_path(k) for k in data_parts], ranks))

        def copy_errors(f):
            for k in parts:
                with open(self.errors_part(k), "rb") as src:
                    shutil.copyfileobj(src, f)
        atomic_write(self.errors_path, copy_errors)
        summary["key_hash"] = self.manifest["key_hash"]
        summary["key"] = self.manifest["key"]   # so a rerun with other settings can say which differ
        write_json(self.summary_path, summary)
        shutil.rmtree(self.dir)
        return summary


def _check_same(old: dict, new: dict, where: str) -> None:
    if old == new:
        return
    if old.get("input") != new.get("input"):
        what = "the input changed since this job started (its fingerprint differs)"
    else:
        what = f"the model or settings differ from the interrupted job's ({_what_differs(old, new)})"
    raise ResumeError(f"refusing to resume: {what}. Rerun with the original command, or pass --overwrite "
                      f"(or delete {where}) to start over")


def _what_differs(old: dict, new: dict) -> str:
    """`engine.dtype: 'auto' then, 'bfloat16' now; ...` for two job keys."""
    if old.get("input") != new.get("input"):
        return "another input: its fingerprint differs"
    return "; ".join(f"{k}: {a!r} then, {b!r} now" for k, a, b in _differences(old, new))


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs, looking inside nested
    settings (the engine's) so the message names `engine.device`, not two whole dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def _as_text(value) -> str | None:
    """A value of a column that mixes types, as text: a string as it is, anything else as JSON."""
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _write_parquet(f, records: list[dict]) -> None:
    """A column whose values mix types (ids or group keys of integers and strings, a kept column of
    strings and objects, ...) is written as text; a column of one type keeps it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name in records[0]:
        values = [r[name] for r in records]
        array = None
        if len({_kind(v) for v in values if v is not None}) <= 1:
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):   # e.g. lists of mixed items
                pass
        columns[name] = array if array is not None else pa.array([_as_text(v) for v in values], pa.string())
    pq.write_table(pa.table(columns), f)


def _target_schema(files: list[str]):
    """One schema for all parts: a column that is text in one part, or has types in two parts that
    do not unify (integers and strings, objects and lists), becomes text everywhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in files]
    fields: dict[str, list] = {}
    for s in schemas:
        for field in s:
            fields.setdefault(field.name, []).append(field)
    out = []
    for name, found in fields.items():
        try:
            unified = pa.unify_schemas([pa.schema([f]) for f in found], promote_options="permissive").field(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            unified = None
        if unified is None or (any(pa.types.is_string(f.type) for f in found) and not pa.types.is_string(unified.type)):
            unified = pa.field(name, pa.string())
        out.append(unified)
    return pa.schema(out)


def _conform(table, schema):
    """A part's table in the merged schema: missing columns null, text columns written as _as_text does."""
    import pyarrow as pa

    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        if column.type == field.type:
            columns.append(column)
        elif pa.types.is_string(field.type):
            columns.append(pa.array([_as_text(v) for v in column.to_pylist()], pa.string()))
        else:
            columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _merge_parquet(f, files: list[str], ranks) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        pq.write_table(pa.table({"id": pa.array([], pa.int64())}), f)
        return
    schema = _target_schema(files)
    if ranks is not None:
        schema = schema.append(pa.field("rank", pa.int64()))
    with pq.ParquetWriter(f, schema) as writer:
        at = 0
        for p in files:
            table = pq.read_table(p)
            if ranks is not None:
                table = table.append_column("rank", pa.array(ranks[at:at + table.num_rows], pa.int64()))
                at += table.num_rows
            writer.write_table(_conform(table, schema) if table.schema != schema else table)


def _merge_jsonl(f, files: list[str], ranks) -> None:
    at = 0
    for p in files:
        with open(p, "rb") as src:
            if ranks is None:
                shutil.copyfileobj(src, f)
                continue
            for line in src:
                rec = json.loads(line)
                rec["rank"] = int(ranks[at])
                at += 1
                f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")


def _group_ranks(files: list[str], fmt: str, group: str):
    """Rank of each output row's score within its group (1 = best, ties share the better rank), in
    output order, and the best-of-N summary. Memory: one key and one score per row."""
    import numpy as np

    keys: list = []
    scores: list = []
    for p in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(p, columns=[group, "score"])
            keys += t.column(group).to_pylist()
            scores += t.column("score").to_pylist()
        else:
            with open(p, "rb") as src:
                for line in src:
                    rec = json.loads(line)
                    keys.append(rec[group])
                    scores.append(rec["score"])
    if not keys:
        return np.zeros(0, dtype=np.int64), {"groups": 0}
    index: dict = {}
    codes = np.array([index.setdefault(str(k), len(index)) for k in keys], dtype=np.int64)
    sc = np.array(scores, dtype=np.float64)
    order = np.lexsort((-sc, codes))          # by group, best score first
    cs, ss = codes[order], sc[order]
    at = np.arange(len(cs))
    new_group = np.r_[True, cs[1:] != cs[:-1]]
    new_run = new_group | np.r_[True, ss[1:] != ss[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, at, 0))
    run_start = np.maximum.accumulate(np.where(new_run, at, 0))
    ranks = np.empty(len(cs), dtype=np.int64)
    ranks[order] = run_start - group_start + 1
    sizes = np.bincount(codes)
    best = np.full(len(sizes), -np.inf)
    np.maximum.at(best, codes, sc)
    mean = np.bincount(codes, weights=sc) / sizes
    stats = {"groups": int(len(sizes)), "mean_group_size": float(sizes.mean()),
             "mean_best_score": float(best.mean()), "mean_score": float(mean.mean()),
             "mean_best_minus_mean": float((best - mean).mean())}
    return ranks, stats
