"""quantization="fp8" end to end on CPU (the PyTorch references + CPU torch._scaled_mm), every family,
against the bf16 and fp32 engines; the quantized linear alone (with a bias, as Qwen2's fused QKV
has); and the settings that cannot run, which must fail clearly."""
import json
import logging
import random

import pytest
import torch
from torch import nn

from rmserve import Engine
from rmserve.engine import EngineConfig, load_tokenizer
from rmserve.kernels.fp8_quant import FP8, TORCH_FP8_OPS, per_token_quant_fp8_ref, select_fp8_ops
from rmserve.loader import load_model
from rmserve.model.fp8 import QUANTIZED, Fp8Linear, Fp8MLP, Fp8RMSNorm, quantize_backbone

from .helpers import FAMILIES, random_conversation

# Tolerance of the FP8 engine, as a multiple of the bf16 engine's own error (both against fp32, RMS
# over the samples): e4m3 keeps 3 mantissa bits where bf16 keeps 7 (unit roundoff 2^-4 against
# 2^-8: x16), and FP8 rounds both operands of each GEMM where bf16 rounds its output once (x2).
# Measured over 10 checkpoint seeds x 5 families (12-16 conversations each): median ratio ~6, max 15.
FP8_OVER_BF16 = 32


@pytest.fixture(scope="module")
def convs():
    rng = random.Random(1234)
    return [random_conversation(rng) for _ in range(12)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_engine_against_bf16_and_fp32(tiny_model, family, convs):
    path = tiny_model(family)
    scores = {}
    for name, settings in {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"},
                           "fp8": {"quantization": "fp8"}}.items():
        engine = Engine.from_pretrained(path, device="cpu", **settings)
        results = engine.score(convs)
        assert not any(r.error for r in results)
        scores[name] = torch.tensor([r.score for r in results], dtype=torch.float64)
    assert engine.dtype == torch.bfloat16 and engine.config.quant_kernels == "torch"
    assert not torch.equal(scores["fp8"], scores["bf16"])        # the FP8 path really ran
    rms = lambda d: d.pow(2).mean().sqrt().item()               # noqa: E731
    fp8_err, bf16_err = rms(scores["fp8"] - scores["fp32"]), rms(scores["bf16"] - scores["fp32"])
    assert fp8_err <= FP8_OVER_BF16 * bf16_err, (fp8_err, bf16_err)


def test_quantized_layers_are_the_table(tiny_model):
    model = load_model(tiny_model("bt"), dtype=torch.bfloat16, quantization="fp8")
    for layer in model.backbone.layers:
        for path in QUANTIZED:
            owner, name = path.split(".")
            lin = getattr(getattr(layer, owner), name)
            assert isinstance(lin, Fp8Linear) and lin.weight.dtype == FP8 and lin.weight_scale.shape == (1, lin.out_features)
        assert isinstance(layer.input_layernorm, Fp8RMSNorm) and isinstance(layer.mlp, Fp8MLP)
    fp8 = {n for n, p in model.backbone.named_parameters() if p.dtype == FP8}
    assert len(fp8) == len(QUANTIZED) * len(model.backbone.layers)
    assert model.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert model.backbone.norm.weight.dtype == torch.bfloat16


def _subset_engine(path: str, linears) -> Engine:
    """An FP8 engine with only `linears` (QUANTIZED keys) quantized, as bench/fp8_accuracy.py builds it."""
    model = load_model(path, dtype=torch.bfloat16)
    quantize_backbone(model.backbone, "fp8", linears=linears)
    model.quantization = "fp8"
    return Engine(model, load_tokenizer(path), EngineConfig(quantization="fp8"))


def test_quantize_a_subset_of_the_table(tiny_model, convs):
    """The per-GEMM ablation's subsets: exactly the named linears become Fp8Linear and exactly their
    producers quantize (a bf16 linear must get a plain tensor); each subset runs, its scores neither
    bf16's nor full FP8's; the whole table is the engine's quantization="fp8"."""
    path = tiny_model("bt")
    producer_of = {"input_layernorm": (Fp8RMSNorm, "self_attn.qkv_proj"),
                   "post_attention_layernorm": (Fp8RMSNorm, "mlp.gate_up_proj"), "mlp": (Fp8MLP, "mlp.down_proj")}
    full = [r.score for r in Engine.from_pretrained(path, device="cpu", quantization="fp8").score(convs)]
    bf16 = [r.score for r in Engine.from_pretrained(path, device="cpu", dtype="bfloat16").score(convs)]
    assert full == [r.score for r in _subset_engine(path, tuple(QUANTIZED)).score(convs)]
    for linears in [(p,) for p in QUANTIZED] + [tuple(q for q in QUANTIZED if q != p) for p in QUANTIZED]:
        engine = _subset_engine(path, linears)
        for layer in engine.model.backbone.layers:
            for p in QUANTIZED:
                owner, name = p.split(".")
                lin = getattr(getattr(layer, owner), name)
                assert isinstance(lin, Fp8Linear) == (p in linears), (linears, p)
                assert lin.weight.dtype == (FP8 if p in linears else torch.bfloat16)
            for name, (cls, consumer) in producer_of.items():
                assert isinstance(getattr(layer, name), cls) == (consumer in linears), (linears, name)
        scores = [r.score for r in engine.score(convs)]
        assert scores != bf16 and scores != full, linears
    for bad in [(), ("self_attn.q_proj",)]:
        with pytest.raises(ValueError, match="non-empty subset of"):
            quantize_backbone(load_model(path, dtype=torch.bfloat16).backbone, "fp8", linears=bad)


@pytest.mark.parametrize("bias", [False, True], ids=["plain", "bias"])
def test_fp8_linear_is_the_dequantized_product(bias, rng):
    """Fp8Linear == (dequantized x) @ (dequantized W).T + bias in fp32, rounded once to bf16."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    lin = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    fp8 = Fp8Linear(lin)
    got = fp8(x)
    qx, sx = per_token_quant_fp8_ref(x)
    qw, sw = per_token_quant_fp8_ref(lin.weight.data)
    want = (qx.float() * sx) @ (qw.float() * sw).t() + (lin.bias.float() if bias else 0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=2 ** -8, atol=1e-5)
    # and near the unquantized layer: e4m3's 2^-4 relative rounding of both operands
    assert (got.float() - lin(x).float()).abs().max() <= 0.15 * lin(x).float().abs().max()


def test_settings_that_cannot_run(tiny_model):
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int8")
    with pytest.raises(ValueError, match="runs in bfloat16"):
        EngineConfig(quantization="fp8", dtype="float32")
    with pytest.raises(ValueError, match="applies to quantization='fp8' only"):
        EngineConfig(quant_kernels="csrc")
    with pytest.raises(ValueError, match="quant_kernels must be one of"):
        EngineConfig(quantization="fp8", quant_kernels="triton")
    path = tiny_model("bt")
    with pytest.raises(ValueError, match="CUDA kernels; the device is cpu"):
        Engine.from_pretrained(path, device="cpu", quantization="fp8", quant_kernels="csrc")
    plain = load_model(path, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="load_model\\(..., quantization='fp8'\\)"):
        Engine(plain, load_tokenizer(path), EngineConfig(quantization="fp8"))


def test_csrc_where_not_built_is_an_error_and_auto_says_so(caplog, monkeypatch):
    """Asking for csrc without rmserve._C raises with how to build it; auto on CUDA logs that the
    references run instead. (rmserve._C is absent on a CPU install; simulated where it is built.)"""
    import rmserve.kernels.fp8_quant as fq

    monkeypatch.setattr(fq, "_CSRC_OPS", None)
    monkeypatch.setattr(fq, "csrc_blocker", lambda: "rmserve._C is not built (simulated)")
    with pytest.raises(RuntimeError, match="not available: rmserve._C is not built .*RMSERVE_BUILD_CSRC=1"):
        select_fp8_ops("csrc", torch.device("cuda"))
    with caplog.at_level(logging.INFO, logger="rmserve"):
        assert select_fp8_ops("auto", torch.device("cuda")) is TORCH_FP8_OPS
        assert select_fp8_ops("auto", torch.device("cpu")) is TORCH_FP8_OPS
    messages = [r.getMessage() for r in caplog.records]
    assert any("run as PyTorch references" in m for m in messages)
    assert any(r.levelno == logging.WARNING and "not built" in r.getMessage() for r in caplog.records)


def test_cli_quantization_flag(tiny_model, tmp_path):
    from rmserve.cli import main

    rows = tmp_path / "in.jsonl"
    rows.write_text("\n".join(json.dumps({"messages": c}) for c in
                              [random_conversation(random.Random(i)) for i in range(3)]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", str(rows), "--model", tiny_model("bt"), "--output", str(out), "--quantization", "fp8",
                 "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 3
