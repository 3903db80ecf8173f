"""The FP8 quantizing references (kernels/fp8_quant.py, the CPU path and the oracle the csrc
kernels are held to) against a plain fp32 computation, and the rounding rule they state:
scale = max(amax / 448, 2^-126), q = e4m3(clamp(y / scale, -448, 448)) rounded to nearest even."""
import pytest
import torch
import torch.nn.functional as F

from rmserve.kernels.fp8_quant import (FP8, FP8_MAX, MIN_SCALE, add_rms_norm_quant_fp8_ref, per_token_quant_fp8_ref,
                                       rms_norm_quant_fp8_ref, silu_mul_quant_fp8_ref)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative rounding of one input-dtype store (half an ulp): the refs round where the model does
# (the sum, the normalised row, the product with the weight, SiLU and its product: up to 3
# stores before quantizing), the fp32 oracle never does.
EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
E4M3_HALF_ULP = 2.0 ** -4      # 3 mantissa bits: nearest-even rounding is within 2^-4 relative (normals)
E4M3_SUB_HALF_STEP = 2.0 ** -10  # subnormal spacing 2^-9: within 2^-10 (times the row scale) absolute


@pytest.fixture
def g(rng):
    return torch.Generator().manual_seed(rng.randrange(1 << 30))


def check_against(y32: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, stores: int) -> None:
    """q * scale within e4m3's rounding (+ `stores` roundings to dtype) of the fp32 oracle y32;
    the scale is amax / 448 of the oracle within those same dtype roundings."""
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (y32.shape[0], 1)
    assert not torch.isnan(q.float()).any()
    rel = stores * EPS[dtype]
    amax = y32.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(scale, torch.clamp(amax / FP8_MAX, min=MIN_SCALE), rtol=rel * 1.01 + 1e-7, atol=0)
    err = (q.float() * scale - y32).abs()
    bound = (E4M3_HALF_ULP + rel * 1.01) * y32.abs() * (1 + rel) + E4M3_SUB_HALF_STEP * scale + 1e-30
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    nonzero = amax.squeeze(1) > 0
    assert (q.float().abs().amax(-1)[nonzero] == FP8_MAX).all()   # each row's largest element is +-448


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,C", [(1, 16), (7, 100), (33, 257)])
def test_per_token_quant(g, dtype, T, C):
    x = (torch.randn(T, C, generator=g) * torch.logspace(-3, 3, T).unsqueeze(1)).to(dtype)
    q, scale = per_token_quant_fp8_ref(x)
    check_against(x.float(), q, scale, dtype, stores=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_quant(g, dtype, residual):
    T, H, eps = 9, 96, 1e-5
    x = torch.randn(T, H, generator=g).to(dtype)
    r = (torch.randn(T, H, generator=g) * 3).to(dtype) if residual else None
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    total32 = x.float() + (r.float() if residual else 0)
    y32 = total32 * torch.rsqrt(total32.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if residual:
        q, scale, total = add_rms_norm_quant_fp8_ref(x, r, w, eps)
        assert total.dtype == dtype
        torch.testing.assert_close(total.float(), total32, rtol=EPS[dtype], atol=0)
    else:
        q, scale = rms_norm_quant_fp8_ref(x, w, eps)
    check_against(y32, q, scale, dtype, stores=3)   # the sum, the normalised row, the product with w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_quant(g, dtype):
    gate_up = (torch.randn(11, 2 * 72, generator=g) * 4).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    q, scale = silu_mul_quant_fp8_ref(gate_up)
    assert q.shape == (11, 72)
    check_against(F.silu(gate) * up, q, scale, dtype, stores=2)   # SiLU, then the product


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_row_huge_value_and_saturation(dtype):
    """An all-zero row (scale 2^-126, q exactly 0), a row with one huge value (it maps to 448,
    the rest stay within 2^-10 scale of theirs), and values that would round past 448 (saturate)."""
    big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}[dtype]
    x = torch.zeros(3, 64, dtype=torch.float32)
    x[1] = torch.linspace(-1, 1, 64)
    x[1, 5] = big
    x[2] = FP8_MAX                   # every element at amax: y / scale = 448 exactly
    x[2, ::2] = FP8_MAX * (1 - 2.0 ** -20)   # just below: rounds to 448, never past it
    x = x.to(dtype)
    q, scale = per_token_quant_fp8_ref(x)
    assert scale[0].item() == MIN_SCALE and (q[0].float() == 0).all()
    assert q[1, 5].float().item() == FP8_MAX and torch.isfinite(q.float()).all()
    assert ((q[1].float() * scale[1] - x[1].float()).abs()[torch.arange(64) != 5] <= 2.0 ** -10 * scale[1]).all()
    assert (q[2].float() == FP8_MAX).all()
    # beyond the row's own amax (a caller's scale): clamped to +-448 before the cast, never NaN
    assert torch.clamp(torch.tensor([500.0, -1e9]), -FP8_MAX, FP8_MAX).to(FP8).float().tolist() == [448.0, -448.0]


def test_nan_propagates_to_the_row():
    x = torch.ones(2, 8)
    x[0, 3] = float("nan")
    q, scale = per_token_quant_fp8_ref(x)
    assert torch.isnan(scale[0]).item() and torch.isnan(q[0].float()).all()
    assert scale[1].item() == torch.tensor(1 / FP8_MAX).item() and (q[1].float() == FP8_MAX).all()


def test_e4m3_rounds_to_nearest_even():
    """Exactly between two neighbouring e4m3 values, the cast picks the one with an even code;
    a hair either side of the midpoint picks the nearer one."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)            # +0 .. 448 (0x7F is NaN)
    values = codes.view(FP8).float()
    lo, hi = values[:-1], values[1:]
    mid = (lo + hi) / 2                                           # exact in fp32
    got = mid.to(FP8).view(torch.uint8)
    want = torch.where(codes[:-1] % 2 == 0, codes[:-1], codes[1:])
    assert torch.equal(got, want)
    below = torch.nextafter(mid, lo).to(FP8).view(torch.uint8)
    above = torch.nextafter(mid, hi).to(FP8).view(torch.uint8)
    assert torch.equal(below, codes[:-1]) and torch.equal(above, codes[1:])


def test_scale_is_an_ieee_division_on_every_device():
    """amax / 448 is divided by a tensor: torch on CUDA computes `t / 448.0` as t * fp32(1/448), an
    ulp off the IEEE quotient (the csrc kernels' __fdiv_rn) for about half of all amax, which CPU
    cannot show; so no division in the reference may take a Python number as its divisor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    divisors = []

    class Divisions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.div:
                divisors.append(args[1])
            return func(*args, **(kwargs or {}))

    with Divisions():
        per_token_quant_fp8_ref(torch.randn(3, 16))
    assert divisors and all(isinstance(d, torch.Tensor) for d in divisors), divisors
