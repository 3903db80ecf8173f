"""rmserve's scores equal transformers' LlamaModel hidden states + a plain head from the spec (fp32)."""
import pytest
import torch

from rmserve import Engine
from rmserve.inputs import Encoded

from .helpers import FAMILIES, random_conversation
from .reference import Reference

# fp32 on CPU: packing and fused projections reorder a few sums; 1e-5 relative is the spec's bar.
RTOL, ATOL = 1e-5, 1e-5

SETTINGS = [
    {},                                                    # the family's published style
    {"llama31": True, "config_style": "transformers5"},    # Llama-3.1 rope scaling, rope_parameters/dtype keys
    {"llama31": False, "shards": 3},                       # Llama-3 (no scaling), sharded with an index
]


def assert_outputs_close(got, want, what=""):
    for key, ref in want.items():
        value = torch.tensor(getattr(got, key), dtype=torch.float32)
        torch.testing.assert_close(value, ref.float().reshape(value.shape), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.parametrize("settings", SETTINGS, ids=["published", "llama31-tf5", "llama3-sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_reference(tiny_model, family, settings, rng):
    path = tiny_model(family, **settings)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu", max_batch_tokens=400)
    ref = Reference(path)
    convs = [random_conversation(rng) for _ in range(7)]
    encoded = engine.encode(convs)
    results = engine.score(convs)
    for enc, res in zip(encoded, results):
        assert isinstance(enc, Encoded) and res.ok, res.error
        assert res.num_tokens == len(enc)
        assert_outputs_close(res, ref.outputs(list(enc.ids), enc.gate), family)


@pytest.mark.parametrize("family", ["bt", "grm"])
def test_head_variants(tiny_model, family, rng):
    """BT with several labels returns all logits; GRM's linear-type value head."""
    settings = {"num_labels": 3} if family == "bt" else {"vhead_layer_type": "linear"}
    path = tiny_model(family, **settings)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    ref = Reference(path)
    convs = [random_conversation(rng) for _ in range(3)]
    for enc, res in zip(engine.encode(convs), engine.score(convs)):
        assert_outputs_close(res, ref.outputs(list(enc.ids), enc.gate), family)
    if family == "bt":
        assert res.score is None and len(res.logits) == 3


def test_qrm_without_stored_transform_is_identity(tiny_model, rng):
    path = tiny_model("qrm", store_transform=False)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    ref = Reference(path)   # its default for a missing matrix is also the identity
    convs = [random_conversation(rng) for _ in range(3)]
    for enc, res in zip(engine.encode(convs), engine.score(convs)):
        assert_outputs_close(res, ref.outputs(list(enc.ids), enc.gate), "qrm")
    assert torch.equal(engine.model.head.reward_transform_matrix, torch.eye(19))


def test_armorm_score_decomposes(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu")
    res = engine.score([random_conversation(rng)])[0]
    assert res.score == pytest.approx(sum(r * c for r, c in zip(res.rewards, res.coefficients)), rel=1e-5)
    assert sum(res.gating) == pytest.approx(float(engine.model.head.gating.logit_scale), rel=1e-5)
    assert len(res.names) == 19 and res.names[0] == "helpsteer-helpfulness"
