"""`Engine.score(..., samples=K, seed=S)`: draws from the distributional heads' outputs.

- URM: `samples` = K draws per attribute from N(mean_a, sigma_a^2) ([attributes][K], sigma under
  the head's spread interpretation, `sigmas`), `score_samples` = the score each joint draw
  implies, sum_a w_a x_a ([K]).
- QRM: `score_samples` = K draws of the score from the sample's gated quantile distribution
  (`reward_quantiles`) by inverse-CDF interpolation (tail rule: kernels/sampling.py);
  `samples` stays None (QRM's per-objective quantiles are not a joint distribution).
- Other families have no distribution to sample: samples > 0 raises ValueError.

Sample identity: each sample's random stream is keyed by a 64-bit hash (BLAKE2b) of the seed
and the sample's token ids, the exact input the model scores. So the same seed gives the same
draws for a sample in any call, batch composition, order, packing or device, and identical
inputs in one call get identical draws. Draws are made after scoring, from the head outputs,
with the engine's kernel choice (Triton or the PyTorch reference: the same Philox stream).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

import torch

from . import devices
from .inputs import Encoded, InputError
from .results import ScoreResult

SAMPLED_FAMILIES = ("urm", "qrm")


def check_sampling(family: str, samples: int, seed: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples must be a non-negative int, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    if samples and family not in SAMPLED_FAMILIES:
        raise ValueError(f"samples={samples}: only distributional heads ({', '.join(SAMPLED_FAMILIES)}) can be "
                         f"sampled; {family} models give a point score")
    if samples >= 2 ** 24:
        raise ValueError(f"samples={samples} is more than rmserve draws per sample (2^24)")


def sample_key(ids: Sequence[int], seed: int) -> int:
    """64-bit key (as a signed int64) of one sample's random stream."""
    h = hashlib.blake2b(digest_size=8, person=b"rmserve-sample")
    h.update(seed.to_bytes(8, "little"))
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in ids))
    return int.from_bytes(h.digest(), "little", signed=True)


@torch.inference_mode()
def add_samples(engine, encoded: Sequence[Encoded | InputError], results: list[ScoreResult], samples: int,
                seed: int) -> list[ScoreResult]:
    """results with `samples` / `score_samples` filled for every scored sample."""
    rows = [i for i, r in enumerate(results) if r.ok]
    if not rows:
        return results
    device = engine.device
    keys = torch.tensor([sample_key(encoded[i].ids, seed) for i in rows], dtype=torch.int64, device=device)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(results[i], name) for i in rows], dtype=torch.float32, device=device)

    out = list(results)
    with devices.on_device(device):   # the Triton kernels launch on the current device
        if engine.family == "urm":
            draws, scores = engine.ops.sample_normal(column("means"), column("sigmas"), column("weights"), keys,
                                                     samples)
            draws, scores = draws.cpu().tolist(), scores.cpu().tolist()
            for j, i in enumerate(rows):
                out[i] = replace(results[i], samples=draws[j], score_samples=scores[j])
        elif engine.family == "qrm":
            scores = engine.ops.sample_quantiles(column("reward_quantiles"), keys, samples).cpu().tolist()
            for j, i in enumerate(rows):
                out[i] = replace(results[i], score_samples=scores[j])
        else:
            raise ValueError(f"{engine.family} models have no distribution to sample")
    return out
