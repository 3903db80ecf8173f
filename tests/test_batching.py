"""Packing and batch invariance: a sample scores the same alone, in any batch, at any position."""
import dataclasses
import random

import pytest
import torch

from rmserve import Engine
from rmserve.packing import pack, plan_batches
from rmserve.tiny import tiny_checkpoint

from .helpers import FAMILIES, random_conversation


def test_pack_layout():
    b = pack([[5, 6, 7], [8], [9, 10]], gates=[1, 0, 0])
    assert b.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.last_idx.tolist() == [2, 3, 5]
    assert b.gate_idx.tolist() == [1, 3, 4]
    assert b.max_seqlen == 3 and b.num_seqs == 3 and b.num_tokens == 6
    with pytest.raises(ValueError):
        pack([[1], []])


def test_plan_batches_random(rng):
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
        budget = rng.randint(300, 2000)
        max_seqs = rng.choice([None, 1, 7])
        batches = plan_batches(lengths, budget, max_seqs)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))         # nothing lost or duplicated
        for b in batches:
            assert sum(lengths[i] for i in b) <= budget or len(b) == 1
            assert max_seqs is None or len(b) <= max_seqs


def test_plan_batches_oversized_sample_alone():
    assert plan_batches([10, 500, 10], 100) == [[1], [0, 2]]


# fp32 on CPU: a row's matmul result can differ in the last bits with the batch's row count
# (BLAS blocking), so "the same" means equal to fp32 rounding of a few ops.
RTOL = 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance_and_order(tiny_model, family, rng):
    engine = Engine.from_pretrained(tiny_model(family), dtype="float32", device="cpu", max_batch_tokens=200)
    convs = [random_conversation(rng, hi=rng.choice([3, 30])) for _ in range(12)]
    alone = [engine.score([c])[0] for c in convs]
    together = engine.score(convs)
    perm = list(range(len(convs)))
    rng.shuffle(perm)
    shuffled = engine.score([convs[i] for i in perm])
    for i, a in enumerate(alone):
        assert together[i].num_tokens == a.num_tokens
        assert together[i].score == pytest.approx(a.score, rel=RTOL, abs=RTOL)
        assert shuffled[perm.index(i)].score == pytest.approx(a.score, rel=RTOL, abs=RTOL)
    engine.config = dataclasses.replace(engine.config, max_batch_tokens=100_000)
    one_batch = engine.score(convs)
    for a, b in zip(alone, one_batch):
        assert b.score == pytest.approx(a.score, rel=RTOL, abs=RTOL)


def test_tiny_presets_are_deterministic(tmp_path):
    a = tiny_checkpoint("armorm", cache_dir=str(tmp_path / "a"))
    b = tiny_checkpoint("armorm", cache_dir=str(tmp_path / "b"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(f"{a}/{name}", "rb") as fa, open(f"{b}/{name}", "rb") as fb:
            assert fa.read() == fb.read(), name
    conv = random_conversation(random.Random(0))
    sa = Engine.from_pretrained(a, dtype="float32", device="cpu").score([conv])[0].score
    sb = Engine.from_pretrained(b, dtype="float32", device="cpu").score([conv])[0].score
    assert sa == sb
