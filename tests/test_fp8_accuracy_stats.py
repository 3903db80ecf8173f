"""bench/fp8_accuracy.py's agreement statistics on synthetic margins: the Gaussian-margin model
(1 - atan(r / k) / pi) matches counted flips, and no statistic blows up on a near-tied pair."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import fp8_accuracy  # noqa: E402


def _scores(margins: torch.Tensor) -> list:
    """Pair scores (chosen, rejected) with the given margins."""
    return torch.stack([margins, torch.zeros_like(margins)], 1).flatten().tolist()


def test_gaussian_margin_model_matches_counted_flips():
    """Margins ~N(0, 1), errors ~N(0, r): counted agreement == 1 - atan(r) / pi (20,000 pairs, +-0.6
    points at 4 standard errors), and the margin scale that reaches 99.5% gives 99.5% when applied."""
    g = torch.Generator().manual_seed(0)
    for r in (0.05, 0.15):
        ref = torch.randn(20_000, generator=g, dtype=torch.float64)
        got = ref + r * torch.randn(20_000, generator=g, dtype=torch.float64)
        s = fp8_accuracy.margin_stats(_scores(got), _scores(ref), boot=2)
        assert abs(s["agree"] - (1 - math.atan(r) / math.pi)) < 0.006, (r, s["agree"])
        assert abs(s["gaussian_agree_at_margins_x"][1] - s["agree"]) < 0.006
        k = s["margins_needed_for_target"]
        assert abs(1 - math.atan(s["margin_err_over_margin_std"] / k) / math.pi - fp8_accuracy.TARGET) < 1e-9


def test_a_near_tied_pair_moves_nothing_much():
    """One pair of 100 with a margin of 1e-6 (the case that made the old '99.5% budget' column read
    54833125): every statistic stays within a few percent of the same set without it."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(100, generator=g, dtype=torch.float64)
    got = ref + 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
    tied_ref, tied_got = ref.clone(), got.clone()
    tied_ref[0], tied_got[0] = 1e-6, 1e-6 + 0.1
    a = fp8_accuracy.margin_stats(_scores(got), _scores(ref), boot=2)
    b = fp8_accuracy.margin_stats(_scores(tied_got), _scores(tied_ref), boot=2)
    assert math.isclose(a["margin_err_over_margin_std"], b["margin_err_over_margin_std"], rel_tol=0.1)
    assert math.isclose(a["margins_needed_for_target"], b["margins_needed_for_target"], rel_tol=0.1)
    assert 1 < b["margins_needed_for_target"] < 20
