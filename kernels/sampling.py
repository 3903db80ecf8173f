"""Sampling the distributional heads' outputs with a counter-based RNG.

URM: K draws per attribute from N(mu_a, sigma_a^2) and the score each draw implies,
     score_k = sum_a w_a * x_{a,k}.
QRM: K draws of the score from the sample's gated quantile distribution
     (`reward_quantiles` at levels tau_q = (q + 1) / (Q + 1)) by inverse-CDF interpolation.

Random numbers: Philox-4x32-10 (Triton's `tl.randint4x`), keyed by one 64-bit key per sample
and counted by the draw's own coordinates, never by the sample's row in the batch:
- URM draw (k, a) uses counter k * A + a; QRM draw k uses counter k.
- uniform u = (bits >> 8) * 2^-24, in [0, 1) with 24 random bits (exact in fp32).
- normal z = sqrt(-2 ln(1 - u1)) * cos(2 pi u2) (Box-Muller on the first two Philox words).
So a sample's draws depend only on (key, k): the same key gives the same draws in any batch,
at any position, and the first K draws do not change when more are asked for. The engine
derives the key from the user's seed and the sample's token ids (see rmserve/sampling.py).
`philox_ref` reimplements Philox in plain PyTorch integer arithmetic, so the torch path draws
the same numbers as the kernels (equal up to the last bits of log/cos).

QRM tail rule: the quantile values are first sorted (the rearrangement that repairs crossing
quantiles; a no-op when the model's quantiles are monotone), then the inverse CDF is the
piecewise-linear interpolation through (tau_q, q_(q)). Below tau_1 and above tau_Q the first and
last segments are extended linearly to u = 0 and u = 1: each tail has the density of its
neighbouring segment and the support is bounded, [2 q_(1) - q_(2), 2 q_(Q) - q_(Q-1)].
With Q = 1 every draw is that single value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch

_M32 = 0xFFFFFFFF
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
TWO_PI = 6.283185307179586
INV_2_24 = 1.0 / (1 << 24)


# ------------------------------------------------------------------------------------------
# plain PyTorch reference
# ------------------------------------------------------------------------------------------

def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a constant a < 2^32 and int64 b in [0, 2^32)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo          # each < 2^48: no int64 overflow
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_ref(keys: torch.Tensor, counters: torch.Tensor, n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox-4x32 as tl.randint4x(key, counter) computes it for an int32 counter.

    keys: int64 [...] (any value, read as uint64), counters: int64 [...] in [0, 2^31), broadcast.
    Returns four int64 tensors holding the uint32 words."""
    keys, counters = torch.broadcast_tensors(keys.to(torch.int64), counters.to(torch.int64))
    k0, k1 = keys & _M32, (keys >> 32) & _M32
    c0, c1 = counters & _M32, torch.zeros_like(counters)
    c2, c3 = torch.zeros_like(counters), torch.zeros_like(counters)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform_ref(bits: torch.Tensor) -> torch.Tensor:
    return (bits >> 8).to(torch.float32) * INV_2_24


def _normal_ref(b0: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    u1, u2 = _uniform_ref(b0), _uniform_ref(b1)
    return torch.sqrt(-2.0 * torch.log(1.0 - u1)) * torch.cos(TWO_PI * u2)


def _check_keys(keys: torch.Tensor, batch: int, num_samples: int) -> None:
    if keys.dtype != torch.int64 or keys.shape != (batch,) or not keys.is_contiguous():   # kernels read key_ptr + b
        raise ValueError(f"keys must be a contiguous int64 [{batch}], got {keys.dtype} {tuple(keys.shape)} with "
                         f"strides {keys.stride()}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def sample_normal_ref(means: torch.Tensor, sigmas: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                      num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """means, sigmas, weights [B, A] float; keys [B] int64 ->
    samples [B, A, K] fp32 (x = mu + sigma z), score_samples [B, K] fp32 (sum_a w_a x_a)."""
    B, A = means.shape
    _check_keys(keys, B, num_samples)
    k = torch.arange(num_samples, device=means.device)
    a = torch.arange(A, device=means.device)
    counters = k[None, :] * A + a[:, None]                                  # [A, K]
    b0, b1, _, _ = philox_ref(keys[:, None, None], counters[None])
    z = _normal_ref(b0, b1)                                                 # [B, A, K]
    x = means.float()[..., None] + sigmas.float()[..., None] * z
    return x, (weights.float()[..., None] * x).sum(dim=1)


def quantile_inverse_cdf_ref(quantiles: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """quantiles [B, Q] at levels (q + 1) / (Q + 1); u [B, K] in [0, 1) -> values [B, K] (tail rule above)."""
    s = quantiles.float().sort(dim=-1).values
    Q = s.shape[-1]
    if Q == 1:
        return s.expand(-1, u.shape[-1]).clone()
    t = u * (Q + 1) - 1.0
    j = t.floor().clamp(0, Q - 2).to(torch.int64)
    lo, hi = s.gather(1, j), s.gather(1, j + 1)
    return lo + (t - j.to(t.dtype)) * (hi - lo)


def sample_quantiles_ref(quantiles: torch.Tensor, keys: torch.Tensor, num_samples: int) -> torch.Tensor:
    """quantiles [B, Q] float (one quantile function per sample); keys [B] int64 -> draws [B, K] fp32."""
    B = quantiles.shape[0]
    _check_keys(keys, B, num_samples)
    k = torch.arange(num_samples, device=quantiles.device)
    b0, _, _, _ = philox_ref(keys[:, None], k[None, :])
    return quantile_inverse_cdf_ref(quantiles, _uniform_ref(b0))


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------

@triton.jit
def _uniform(bits):
    return (bits >> 8).to(tl.float32) * 5.9604644775390625e-08     # 2^-24


# One binary serves every K: K and the strides that follow it are not specialised (Triton would
# otherwise compile K == 1 and K % 16 == 0 apart) and the block of draws is fixed. Grid: samples on
# axis 0 (CUDA allows 2^31 - 1), at most MAX_K_PROGRAMS programs per sample on axis 1 (CUDA allows
# 65,535), each looping over the blocks kb = program_id(1), + num_programs(1), ... of its sample, so
# any K < 2^24 fits. The loops are `while` loops: Triton 3.6's interpreter (the GPU image's) cannot
# take range() over runtime values with NumPy >= 2.4 (triton-lang/triton#9171). 16 programs per sample fill a GPU for the batches the engine samples (the draws
# end as Python floats, which costs far more than drawing them) and keep the interpreter fast (it
# pays per program); the QRM kernel also sorts its quantiles once per program, not once per block.
NORMAL_BLOCK_K = 256
QUANTILE_TILE = 2048       # the QRM lookup's one-hot [BLOCK_K, BLOCK_Q] tile: 64 x 32 for Q = 19 (no spills)
MAX_K_PROGRAMS = 16


@triton.jit(do_not_specialize=["K", "stride_xb", "stride_xa", "stride_sb"])
def _sample_normal_kernel(mu_ptr, sigma_ptr, w_ptr, key_ptr, x_ptr, score_ptr,
                          A, K, stride_mu, stride_sigma, stride_w, stride_xb, stride_xa, stride_sb,
                          BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, BLOCK_A)
    a_ok = a < A
    mu = tl.load(mu_ptr + b * stride_mu + a, mask=a_ok, other=0.0).to(tl.float32)
    sigma = tl.load(sigma_ptr + b * stride_sigma + a, mask=a_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + b * stride_w + a, mask=a_ok, other=0.0).to(tl.float32)
    key = tl.load(key_ptr + b)
    kb = tl.program_id(1)
    while kb < tl.cdiv(K, BLOCK_K):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        counter = ks[None, :] * A + a[:, None]                              # int32: k * A + a
        b0, b1, _, _ = tl.randint4x(key, counter)
        u1 = _uniform(b0)
        u2 = _uniform(b1)
        z = tl.sqrt(-2.0 * tl.log(1.0 - u1)) * tl.cos(6.283185307179586 * u2)
        x = mu[:, None] + sigma[:, None] * z                                # [BLOCK_A, BLOCK_K]
        ok = a_ok[:, None] & k_ok[None, :]
        tl.store(x_ptr + b * stride_xb + a[:, None] * stride_xa + ks[None, :], x, mask=ok)
        score = tl.sum(tl.where(ok, w[:, None] * x, 0.0), axis=0)
        tl.store(score_ptr + b * stride_sb + ks, score, mask=k_ok)
        kb += tl.num_programs(1)


@triton.jit(do_not_specialize=["K", "stride_o"])
def _sample_quantiles_kernel(q_ptr, key_ptr, out_ptr, Q, K, j_max, stride_q, stride_o,
                             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    qs = tl.arange(0, BLOCK_Q)
    vals = tl.load(q_ptr + b * stride_q + qs, mask=qs < Q, other=float("inf")).to(tl.float32)
    s = tl.sort(vals)                                                       # padding (+inf) sorts last
    key = tl.load(key_ptr + b)
    kb = tl.program_id(1)
    while kb < tl.cdiv(K, BLOCK_K):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        b0, _, _, _ = tl.randint4x(key, ks)
        t = _uniform(b0) * (Q + 1) - 1.0
        j = tl.minimum(tl.maximum(tl.floor(t), 0.0), j_max)               # segment: 0 .. max(Q - 2, 0)
        ji = j.to(tl.int32)
        lo = tl.sum(tl.where(qs[None, :] == ji[:, None], s[None, :], 0.0), axis=1)
        hi_idx = tl.minimum(ji + 1, Q - 1)
        hi = tl.sum(tl.where(qs[None, :] == hi_idx[:, None], s[None, :], 0.0), axis=1)
        x = lo + (t - j) * (hi - lo)
        tl.store(out_ptr + b * stride_o + ks, x, mask=ks < K)
        kb += tl.num_programs(1)


def _grid(batch: int, num_samples: int, block_k: int) -> tuple[int, int]:
    return batch, min(triton.cdiv(num_samples, block_k), MAX_K_PROGRAMS)


def sample_normal(means: torch.Tensor, sigmas: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
                  num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `sample_normal_ref`; same shapes, same draws.

    means, sigmas, weights: [B, A] float (any float dtype, last dim contiguous); keys: [B] int64.
    Returns samples [B, A, K] fp32 and score_samples [B, K] fp32. One launch, no host sync."""
    B, A = means.shape
    _check_keys(keys, B, num_samples)
    for name, t in (("sigmas", sigmas), ("weights", weights)):
        if t.shape != means.shape:
            raise ValueError(f"{name} must have the shape of means {tuple(means.shape)}, got {tuple(t.shape)}")
    for t in (means, sigmas, weights):
        if t.stride(-1) != 1:
            raise ValueError("means, sigmas and weights need a contiguous last dimension")
    if num_samples * A >= 2 ** 31:
        raise ValueError("num_samples * attributes must stay below 2^31 (32-bit Philox counters)")
    x = torch.empty(B, A, num_samples, dtype=torch.float32, device=means.device)
    score = torch.empty(B, num_samples, dtype=torch.float32, device=means.device)
    if B:
        launch(_sample_normal_kernel, _grid(B, num_samples, NORMAL_BLOCK_K), means, sigmas, weights, keys, x, score,
               A, num_samples, means.stride(0), sigmas.stride(0), weights.stride(0), x.stride(0), x.stride(1),
               score.stride(0), BLOCK_A=triton.next_power_of_2(A), BLOCK_K=NORMAL_BLOCK_K)
    return x, score


def sample_quantiles(quantiles: torch.Tensor, keys: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Triton version of `sample_quantiles_ref`: quantiles [B, Q] float (last dim contiguous),
    keys [B] int64 -> draws [B, K] fp32. One launch, no host sync."""
    B, Q = quantiles.shape
    _check_keys(keys, B, num_samples)
    if quantiles.stride(-1) != 1:
        raise ValueError("quantiles need a contiguous last dimension")
    if num_samples >= 2 ** 31:
        raise ValueError("num_samples must stay below 2^31 (32-bit Philox counters)")
    out = torch.empty(B, num_samples, dtype=torch.float32, device=quantiles.device)
    block_q = max(triton.next_power_of_2(Q), 2)
    block_k = max(QUANTILE_TILE // block_q, 16)
    if B:
        launch(_sample_quantiles_kernel, _grid(B, num_samples, block_k), quantiles, keys, out, Q, num_samples,
               float(max(Q - 2, 0)), quantiles.stride(0), out.stride(0), BLOCK_Q=block_q, BLOCK_K=block_k)
    return out
