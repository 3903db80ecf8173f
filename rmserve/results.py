"""What a scored sample gives back. Which fields are set depends on the family:

| family | fields                                                                     |
|--------|----------------------------------------------------------------------------|
| bt     | score (one label) or logits (several labels)                               |
| armorm | score, rewards (untransformed), gating, coefficients (score = rewards·coefficients) |
| qrm    | score, rewards (μ @ T), gating, reward_quantiles, quantiles (per objective) |
| urm    | score, means, spreads (raw), sigmas, weights                               |
| grm    | score                                                                      |
| qwen2_rm | score                                                                    |
| qwen2_prm | step_rewards (one per step of the answer), score (their aggregate: steps.AGGREGATIONS) |

`samples` / `score_samples` are set when sampling was asked for. A sample that could not be
scored has `error` set and no outputs.

`ResultMaker` turns a batch's head outputs (one row per sample, or per step for a head's
`step_outputs`) into ScoreResults, splitting the step rows by each sample's step count, which the
host has had since it packed the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

from .steps import aggregate

OUTPUT_FIELDS = ("logits", "rewards", "gating", "coefficients", "reward_quantiles", "quantiles",
                 "means", "spreads", "sigmas", "weights", "samples", "score_samples", "step_rewards")


@dataclass(frozen=True)
class ScoreResult:
    score: float | None = None
    error: str | None = None
    num_tokens: int = 0
    names: tuple[str, ...] = ()          # objective / attribute names of the per-head vectors
    logits: list[float] | None = None
    rewards: list[float] | None = None
    gating: list[float] | None = None
    coefficients: list[float] | None = None
    reward_quantiles: list[float] | None = None
    quantiles: list[list[float]] | None = None
    means: list[float] | None = None
    spreads: list[float] | None = None
    sigmas: list[float] | None = None
    weights: list[float] | None = None
    samples: list[list[float]] | None = None
    score_samples: list[float] | None = None
    step_rewards: list[float] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (None fields and empty names left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and not (f.name == "names" and not self.names)}


NON_FINITE = "the model produced a non-finite output (NaN or infinity)"


def _finite(value) -> bool:
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return value is None or math.isfinite(value)


@dataclass(frozen=True)
class ResultMaker:
    """A batch's head outputs -> one ScoreResult per sample row.

    names: the head's objective / attribute names; step_outputs: outputs with one row per step (a
    process reward model's step_rewards); step_aggregation: the rule that makes `score` from a
    sample's step_rewards (steps.AGGREGATIONS; None: the head gives `score` itself)."""
    names: tuple[str, ...] = ()
    step_outputs: tuple[str, ...] = ()
    step_aggregation: str | None = None

    def __call__(self, outputs: dict[str, list], lengths: Sequence[int],
                 step_counts: Sequence[int]) -> list[ScoreResult]:
        """outputs: host lists ([rows] or [steps] for the step outputs); lengths and step_counts: per
        row, its tokens and steps."""
        results, at = [], 0
        for row, (n, k) in enumerate(zip(lengths, step_counts)):
            values = {name: (v[at:at + k] if name in self.step_outputs else v[row]) for name, v in outputs.items()}
            at += k
            if not all(_finite(v) for v in values.values()):   # an error, never a NaN score (fp16 overflow, say)
                results.append(ScoreResult(error=NON_FINITE, num_tokens=n))
                continue
            if self.step_aggregation is not None:
                values["score"] = aggregate(self.step_aggregation, values["step_rewards"])
            results.append(ScoreResult(num_tokens=n, names=self.names, **values))
        return results
