"""The csrc FP8 kernels against their PyTorch references on the GPU, and the FP8 engine on CUDA.

Equality, and why (the references run on the same GPU):
- per_token_quant_fp8: bitwise (q codes and scales). amax is exact in any order, and both sides
  divide in IEEE fp32 and round to e4m3 nearest-even with saturation.
- rms_norm_quant_fp8 / add_rms_norm_quant_fp8: the residual sum bitwise; q within 1 e4m3 ulp (code
  difference <= 1) and scales within one model-dtype ulp of amax (bf16, fp16). The kernel's fp32
  sum of squares runs in another order than torch's mean, and its 1/sqrt is IEEE where torch.rsqrt
  on CUDA is rsqrtf (up to 2 ulp, CUDA's math API table): inv_rms can differ in its last bits, the
  normalised row then by one bf16 ulp at a rounding boundary, which moves amax (the scale) by a
  bf16 ulp or an e4m3 code by one. In fp32 nothing rounds inv_rms's error away: every y, and the
  scale, carries it, a few fp32 ulps (NORM_SCALE_RTOL).
- silu_mul_quant_fp8: the same 1-ulp rule (SiLU's expf against torch's exp may differ in the last
  fp32 bit); almost every element is bitwise equal, which the tests also require (>= 99%).
Run where CUDA is available; the kernel tests need rmserve._C built (RMSERVE_REQUIRE_CSRC=1 makes
its absence a failure rather than a skip, as the lease script sets it).
"""
import os
import random

import pytest
import torch

from rmserve.kernels.fp8_quant import (FP8, add_rms_norm_quant_fp8_ref, csrc_blocker, csrc_fp8_ops,
                                       per_token_quant_fp8_ref, rms_norm_quant_fp8_ref, silu_mul_quant_fp8_ref)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}   # relative, at worst
# rms_norm's scales: fp32's inv_rms differs by up to ~2 ulps (sum order) + 2 (rsqrtf), and y rounds twice
NORM_SCALE_RTOL = {**ULP, torch.float32: 2.0 ** -20}


def csrc():
    why = csrc_blocker() if torch.cuda.is_available() else "no CUDA"
    if why is not None:
        if os.environ.get("RMSERVE_REQUIRE_CSRC") == "1":
            pytest.fail(f"RMSERVE_REQUIRE_CSRC=1 but {why}")
        pytest.skip(why)
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 kernels and torch._scaled_mm need sm_89+")
    return csrc_fp8_ops()


@pytest.fixture
def g(rng):
    return torch.Generator(device="cuda").manual_seed(rng.randrange(1 << 30))


def signed_code(q: torch.Tensor) -> torch.Tensor:
    c = q.view(torch.uint8).to(torch.int32)
    return torch.where(c >= 128, -(c - 128), c)


def assert_within_one_ulp(q, scale, q_ref, scale_ref, dtype, min_equal=0.99, scale_rtol=ULP):
    assert q.dtype == FP8 and scale.dtype == torch.float32 and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    torch.testing.assert_close(scale, scale_ref, rtol=scale_rtol[dtype], atol=0)
    diff = (signed_code(q) - signed_code(q_ref)).abs()
    assert diff.max().item() <= 1
    assert (diff == 0).float().mean().item() >= min_equal


def rows(g, T, C, dtype, stride_pad=0, offset=0):
    """Rows with a spread of magnitudes, an all-zero row, a row with one huge value; optionally strided,
    and starting `offset` elements into their storage (a data_ptr off the 16-byte vector alignment)."""
    x = torch.randn(T, C + stride_pad, generator=g, device="cuda") * torch.logspace(-2, 2, T, device="cuda")[:, None]
    x[0] = 0
    if T > 2:
        x[1, offset + C // 2] = 1e4
    return x.to(dtype)[:, offset:offset + C]


SHAPES = [(1, 8), (5, 100), (37, 4096), (3, 4104), (16, 14336), (2, 7)]   # vector and scalar paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,C", SHAPES)
@pytest.mark.parametrize("pad,offset", [(0, 0), (8, 0), (3, 0), (8, 1)],
                         ids=["dense", "strided", "unaligned", "misaligned-pointer"])
def test_per_token_quant_bitwise(g, T, C, dtype, pad, offset):
    ops = csrc()
    x = rows(g, T, C, dtype, pad, offset)   # misaligned-pointer: a stride fit for 16-byte vectors, a data_ptr not
    q, scale = ops.per_token_quant(x)
    q_ref, scale_ref = per_token_quant_fp8_ref(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H", [(1, 64), (9, 100), (33, 4096), (4, 4100)])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_quant(g, T, H, dtype, residual):
    ops = csrc()
    x = rows(g, T, H, dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g, device="cuda")).to(dtype)
    w[: min(6, H)] *= 20                                                # outlier channels
    if residual:
        r = (torch.randn(T, H, generator=g, device="cuda") * 3).to(dtype)
        q, scale, total = ops.add_rms_norm_quant(x, r, w, 1e-5)
        q_ref, scale_ref, total_ref = add_rms_norm_quant_fp8_ref(x, r, w, 1e-5)
        assert torch.equal(total, total_ref)
    else:
        q, scale = ops.rms_norm_quant(x, w, 1e-5)
        q_ref, scale_ref = rms_norm_quant_fp8_ref(x, w, 1e-5)
    assert_within_one_ulp(q, scale, q_ref, scale_ref, dtype, min_equal=0.95, scale_rtol=NORM_SCALE_RTOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,inter", [(1, 8), (7, 100), (20, 14336), (3, 21)])
def test_silu_mul_quant(g, T, inter, dtype):
    ops = csrc()
    gate_up = (torch.randn(T, 2 * inter, generator=g, device="cuda") * 4).to(dtype)
    q, scale = ops.silu_mul_quant(gate_up)
    assert_within_one_ulp(q, scale, *silu_mul_quant_fp8_ref(gate_up), dtype)


def test_ops_check_and_zero_rows(g):
    ops = csrc()
    x = torch.randn(6, 64, generator=g, device="cuda").bfloat16()
    w = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    for op, args in [(torch.ops.rmserve.per_token_quant_fp8, (x,)),
                     (torch.ops.rmserve.rms_norm_quant_fp8, (x, w, 1e-5)),
                     (torch.ops.rmserve.add_rms_norm_quant_fp8, (x, x.clone(), w, 1e-5)),
                     (torch.ops.rmserve.silu_mul_quant_fp8, (x,))]:
        torch.library.opcheck(op, args)
        assert all(t.shape[0] == 0 for t in op(*((a[:0] if isinstance(a, torch.Tensor) and a.dim() == 2 else a)
                                                    for a in args)))
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        ops.per_token_quant(x.t())
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.per_token_quant(x.cpu())
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.per_token_quant(x.to(torch.float64))
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        ops.rms_norm_quant(x, w[:32], 1e-5)


def test_ops_capture_in_a_cuda_graph(g):
    """The ops launch on the current stream with no host sync: captured once, replayed on new data."""
    ops = csrc()
    x = torch.randn(16, 256, generator=g, device="cuda").bfloat16()
    r, w = torch.randn_like(x), torch.ones(256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up off the capture (each op's first launch loads its kernel)
        ops.add_rms_norm_quant(x, r, w, 1e-5), ops.silu_mul_quant(x), ops.per_token_quant(r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.add_rms_norm_quant(x, r, w, 1e-5) + ops.silu_mul_quant(x) + ops.per_token_quant(r)
    x.copy_(torch.randn(16, 256, generator=g, device="cuda"))
    graph.replay()
    want = ops.add_rms_norm_quant(x, r, w, 1e-5) + ops.silu_mul_quant(x) + ops.per_token_quant(r)
    for a, b in zip(out, want):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)


@pytest.mark.parametrize("family", ["bt", "armorm", "urm"])
def test_fp8_engine_on_cuda(tiny_model, family):
    """The FP8 engine on CUDA (csrc ops where built, CUDA graphs on) against the bf16 engine, within the
    CPU test's tolerance (tests/test_fp8_engine.py), and the csrc ops against the references."""
    from rmserve import Engine

    from ..helpers import random_conversation
    from ..test_fp8_engine import FP8_OVER_BF16

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")
    rng = random.Random(7)
    convs = [random_conversation(rng) for _ in range(24)]
    path = tiny_model(family)
    settings = {"fp32": dict(dtype="float32", attention="reference", enforce_eager=True), "bf16": dict(dtype="bfloat16"),
                "fp8": dict(quantization="fp8"), "fp8_torch": dict(quantization="fp8", quant_kernels="torch")}
    scores = {}
    for name, kw in settings.items():
        engine = Engine.from_pretrained(path, device="cuda", **kw)
        if name == "fp8" and csrc_blocker() is None:
            assert engine.config.quant_kernels == "csrc"
        scores[name] = torch.tensor([r.score for r in engine.score(convs)], dtype=torch.float64)
    rms = lambda d: d.pow(2).mean().sqrt().item()   # noqa: E731
    assert rms(scores["fp8"] - scores["fp32"]) <= FP8_OVER_BF16 * rms(scores["bf16"] - scores["fp32"])
    # csrc against the references inside the model: 1-ulp differences in a few e4m3 codes only
    assert rms(scores["fp8"] - scores["fp8_torch"]) <= rms(scores["fp8"] - scores["fp32"])
