"""One part of the job: rows -> encoded samples -> scores -> output records, error records, stats.

The single-process job and the Ray actors both run exactly these functions on exactly the rows
of a part, so a part's values do not depend on how the job was run or resumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..inputs import Encoded, InputError
from ..results import OUTPUT_FIELDS, ScoreResult
from .shapes import Row, RowError, ShapeConfig

# Output columns the job itself writes; a kept input column must not shadow them.
RESERVED = {"id", "score", "error", "num_tokens", "names", "margin", "chosen_wins", "rank", "best",
            *OUTPUT_FIELDS}


def written_columns(cfg: ShapeConfig) -> set[str]:
    """The output columns a job of this (resolved) shape writes itself: RESERVED, and a pair's every
    field twice (chosen_score, rejected_rewards, ...)."""
    if cfg.shape != "pair":
        return RESERVED
    return RESERVED | {f"{side}_{name}" for side in cfg.sides() for name in ("score", "num_tokens", *OUTPUT_FIELDS)}


def check_columns(cfg: ShapeConfig) -> None:
    """--keep and --group-field (both copied to the output) must not name a column the job writes
    itself: one would replace the other's values (--group-field id, say, the row ids)."""
    written = written_columns(cfg)
    clash = set(cfg.keep) & written
    if clash:
        raise ValueError(f"--keep columns {sorted(clash)} would shadow the job's own output columns")
    same = cfg.group_field == "id" == cfg.id_field and cfg.ids_from_column is not False   # the id column itself
    if cfg.group_field in written and not same:
        raise ValueError(f"--group-field {cfg.group_field} is also one of the job's own output columns; the two "
                         "would overwrite each other (rename the column in the input)")


@dataclass
class Encoding:
    """A part after tokenization: the good rows, their samples flattened, and the bad rows."""
    rows: list[Row]
    encoded: list[Encoded | InputError]   # samples of rows[0], then rows[1], ...
    groups: list[Any]                     # per sample: the key of the prompt it shares (pair/prompt id)
    bad: list[RowError] = field(default_factory=list)


def encode_rows(encode: Callable[[Sequence[Any]], list], items: Sequence[Row | RowError]) -> Encoding:
    """encode: Engine.encode or Preprocessor.encode_many (the same function)."""
    rows = [r for r in items if isinstance(r, Row)]
    bad = [r for r in items if isinstance(r, RowError)]
    convs = [s for r in rows for s in r.samples]
    groups = [r.group for r in rows for _ in r.samples]
    return Encoding(rows, encode(convs) if convs else [], groups, bad)


def score_samples(engine, encoded: Sequence[Encoded | InputError], groups: Sequence[Any], samples: int = 0,
                  seed: int = 0) -> list[ScoreResult]:
    """The job's one call into the engine, as Engine.score makes it. `groups[i]` is the key of the
    prompt sample i shares with others (pair, multi row, group column; None: a lone sample). The keys
    go to the engine's shared-prefix scoring (rmserve/prefix.py) when some key is shared; when none
    is (one answer per row, no group field) the engine finds shared prompts by itself.
    samples, seed: URM/QRM draws (rmserve/sampling.py), as Engine.score(samples=, seed=)."""
    from ..sampling import add_samples

    keys = [g for g in groups if g is not None]
    shared = len(set(keys)) < len(keys)
    results = engine.score_encoded(encoded, groups if shared else None)
    return add_samples(engine, encoded, results, samples, seed) if samples else results


def result_fields(res: ScoreResult) -> dict[str, Any]:
    out = res.to_dict()
    out.pop("names", None)
    out.pop("error", None)
    return out


def ranks(scores: Sequence[float]) -> list[int]:
    """1 = best; ties share the better rank (1, 2, 2, 4)."""
    return [1 + sum(other > s for other in scores) for s in scores]


@dataclass
class PartOutput:
    records: list[dict]
    errors: list[dict]
    stats: dict


def build_outputs(cfg: ShapeConfig, enc: Encoding, results: Sequence[ScoreResult], first_row: int,
                  num_rows: int) -> PartOutput:
    """Output records (input order) and error records for one part; stats for the manifest."""
    records: list[dict] = []
    errors = [{"row": b.index, "id": b.id, "error": b.error} for b in enc.bad]
    stats = {"first_row": first_row, "rows": num_rows, "scored": 0, "errors": 0, "tokens": 0}
    if cfg.shape == "pair":
        stats.update(pairs=0, chosen_wins=0, ties=0)
    if cfg.shape == "multi":
        stats.update(groups=0, group_size_sum=0, best_score_sum=0.0, mean_score_sum=0.0)
    needs_score = cfg.shape in ("pair", "multi") or cfg.group_field is not None
    at = 0
    for row in enc.rows:
        res = list(results[at:at + len(row.samples)])
        at += len(row.samples)
        problem = _problem(cfg, res, needs_score)
        if problem:
            errors.append({"row": row.index, "id": row.id, "error": problem})
            continue
        rec: dict[str, Any] = {"id": row.id}
        if cfg.group_field:
            rec[cfg.group_field] = row.group
        rec.update(row.keep)
        if cfg.shape == "pair":
            c, r = res
            rec["margin"] = c.score - r.score
            rec["chosen_wins"] = c.score > r.score
            rec.update({f"chosen_{k}": v for k, v in result_fields(c).items()})
            rec.update({f"rejected_{k}": v for k, v in result_fields(r).items()})
            stats["pairs"] += 1
            stats["chosen_wins"] += int(c.score > r.score)
            stats["ties"] += int(c.score == r.score)
        elif cfg.shape == "multi":
            scores = [x.score for x in res]
            rk = ranks(scores)
            rec["rank"], rec["best"] = rk, rk.index(1)
            per = [result_fields(x) for x in res]
            rec.update({k: [p[k] for p in per] for k in per[0]})
            stats["groups"] += 1
            stats["group_size_sum"] += len(scores)
            stats["best_score_sum"] += max(scores)
            stats["mean_score_sum"] += sum(scores) / len(scores)
        else:
            rec.update(result_fields(res[0]))
        stats["tokens"] += sum(x.num_tokens for x in res)
        records.append(rec)
    errors.sort(key=lambda e: e["row"])
    stats["scored"], stats["errors"] = len(records), len(errors)
    return PartOutput(records, errors, stats)


def _problem(cfg: ShapeConfig, res: list[ScoreResult], needs_score: bool) -> str | None:
    names = [f"{s}" for s in cfg.sides()] if cfg.shape == "pair" else None
    for i, x in enumerate(res):
        where = (names[i] + ": " if names else f"{cfg.responses_field}[{i}]: " if cfg.shape == "multi" else "")
        if x.error is not None:
            return where + x.error
        if needs_score and x.score is None:
            return where + "the model gives no single score (several labels); pairs and best-of-N need one"
    return None
