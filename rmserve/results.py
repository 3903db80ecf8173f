"""What a scored sample gives back. Which fields are set depends on the family:

| family | fields                                                                     |
|--------|----------------------------------------------------------------------------|
| bt     | score (one label) or logits (several labels)                               |
| armorm | score, rewards (untransformed), gating, coefficients (score = rewards·coefficients) |
| qrm    | score, rewards (μ @ T), gating, reward_quantiles, quantiles (per objective) |
| urm    | score, means, spreads (raw), sigmas, weights                               |
| grm    | score                                                                      |
| qwen2_rm | score                                                                    |

`samples` / `score_samples` are set when sampling was asked for. A sample that could not be
scored has `error` set and no outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

OUTPUT_FIELDS = ("logits", "rewards", "gating", "coefficients", "reward_quantiles", "quantiles",
                 "means", "spreads", "sigmas", "weights", "samples", "score_samples")


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

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (None fields and empty names left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None and not (f.name == "names" and not self.names)}
