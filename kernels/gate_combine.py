"""ArmoRM / QRM: gating softmax and transform-matrix combine, one launch per batch.

From the gating logits u [B, N], the transform matrix Tm [N, N], temperature t and logit_scale s:
    gates        g = softmax(u / t) * s                      (sums to s, not 1)
    coefficients c = g @ Tmᵀ                                 (c_i = sum_j Tm[i, j] g_j)
ArmoRM, with the untransformed rewards r [B, N]:
    score = sum_j g_j (r @ Tm)_j = r · c
QRM, with the quantile matrix R [B, N, Q] (objective-major, as the head reshapes it):
    rewards = mean_q(R) @ Tm,  score = g · rewards,  reward_quantiles[q] = sum_j g_j (R[:, q] @ Tm)_j = R[:, q] · c

The `*_ref` functions are the heads' PyTorch path (in the head's dtype, the references' cast
points). The kernels read any float dtype and compute everything in fp32, returning fp32: in a
bf16 ArmoRM head that is more accurate than the bf16 reference path (tests bound the gap).
logit_scale is read from its [1] tensor on the device, so there is no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch


def armo_combine_ref(u: torch.Tensor, rewards: torch.Tensor, transform: torch.Tensor, temperature: float,
                     logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gates [B, N], coefficients [B, N], score [B], in the inputs' dtype."""
    gates = torch.softmax(u / temperature, dim=-1) * logit_scale
    score = (gates * (rewards @ transform)).sum(dim=-1)
    return gates, gates @ transform.T, score


def qrm_combine_ref(u: torch.Tensor, quantiles: torch.Tensor, transform: torch.Tensor, temperature: float,
                    logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gates [B, N], rewards [B, N], score [B], reward_quantiles [B, Q], in the inputs' dtype."""
    gates = torch.softmax(u / temperature, dim=-1) * logit_scale
    rewards = quantiles.mean(dim=-1) @ transform
    score = (gates * rewards).sum(dim=-1)
    mixture = ((quantiles.transpose(1, 2) @ transform) * gates[:, None, :]).sum(dim=-1)
    return gates, rewards, score, mixture


@triton.jit
def _gates_and_coefficients(u_ptr, tm_ptr, scale_ptr, b, N, stride_u, stride_tm, temperature,
                            BLOCK_N: tl.constexpr):
    """-> (g [BLOCK_N] along j, coefficients [BLOCK_N] along i, tm tile [i, j], masks)."""
    i = tl.arange(0, BLOCK_N)
    ok = i < N
    u = tl.load(u_ptr + b * stride_u + i, mask=ok, other=float("-inf")).to(tl.float32) / temperature
    e = tl.exp(u - tl.max(u, axis=0))
    g = e / tl.sum(e, axis=0) * tl.load(scale_ptr).to(tl.float32)
    tm = tl.load(tm_ptr + i[:, None] * stride_tm + i[None, :], mask=ok[:, None] & ok[None, :], other=0.0)
    tm = tm.to(tl.float32)
    coef = tl.sum(tm * g[None, :], axis=1)
    return g, coef, tm, ok


@triton.jit
def _armo_combine_kernel(u_ptr, r_ptr, tm_ptr, scale_ptr, gates_ptr, coef_ptr, score_ptr, N,
                         stride_u, stride_r, stride_tm, stride_g, stride_c, temperature,
                         BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g, coef, tm, ok = _gates_and_coefficients(u_ptr, tm_ptr, scale_ptr, b, N, stride_u, stride_tm,
                                              temperature, BLOCK_N)
    i = tl.arange(0, BLOCK_N)
    r = tl.load(r_ptr + b * stride_r + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(gates_ptr + b * stride_g + i, g, mask=ok)
    tl.store(coef_ptr + b * stride_c + i, coef, mask=ok)
    tl.store(score_ptr + b, tl.sum(r * coef, axis=0))


@triton.jit
def _qrm_combine_kernel(u_ptr, q_ptr, tm_ptr, scale_ptr, gates_ptr, rewards_ptr, score_ptr, mix_ptr, N, Q,
                        stride_u, stride_qb, stride_qn, stride_tm, stride_g, stride_r, stride_m,
                        temperature, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g, coef, tm, ok = _gates_and_coefficients(u_ptr, tm_ptr, scale_ptr, b, N, stride_u, stride_tm,
                                              temperature, BLOCK_N)
    i = tl.arange(0, BLOCK_N)
    qs = tl.arange(0, BLOCK_Q)
    q_ok = qs < Q
    R = tl.load(q_ptr + b * stride_qb + i[:, None] * stride_qn + qs[None, :], mask=ok[:, None] & q_ok[None, :],
                other=0.0).to(tl.float32)                                   # [objective i, quantile q]
    mu = tl.sum(R, axis=1) / Q
    rewards = tl.sum(mu[:, None] * tm, axis=0)                              # along j
    tl.store(gates_ptr + b * stride_g + i, g, mask=ok)
    tl.store(rewards_ptr + b * stride_r + i, rewards, mask=ok)
    tl.store(score_ptr + b, tl.sum(g * rewards, axis=0))
    tl.store(mix_ptr + b * stride_m + qs, tl.sum(R * coef[:, None], axis=0), mask=q_ok)


def _check(u: torch.Tensor, transform: torch.Tensor, logit_scale: torch.Tensor, temperature: float) -> None:
    if u.dim() != 2 or u.stride(-1) != 1:
        raise ValueError(f"gating logits must be [B, N] with a contiguous last dimension, got {tuple(u.shape)}")
    N = u.shape[1]
    if transform.shape != (N, N) or transform.stride(-1) != 1:
        raise ValueError(f"transform must be [{N}, {N}] with a contiguous last dimension, got {tuple(transform.shape)}")
    if logit_scale.numel() != 1:
        raise ValueError("logit_scale must hold one value")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def armo_combine(u: torch.Tensor, rewards: torch.Tensor, transform: torch.Tensor, temperature: float,
                 logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, rewards [B, N] (any float dtype), transform [N, N], logit_scale [1] ->
    gates [B, N], coefficients [B, N], score [B], all fp32."""
    _check(u, transform, logit_scale, temperature)
    B, N = u.shape
    if rewards.shape != (B, N) or rewards.stride(-1) != 1:
        raise ValueError(f"rewards must be [{B}, {N}] with a contiguous last dimension, got {tuple(rewards.shape)}")
    gates = torch.empty(B, N, dtype=torch.float32, device=u.device)
    coef = torch.empty_like(gates)
    score = torch.empty(B, dtype=torch.float32, device=u.device)
    if B:
        launch(_armo_combine_kernel, (B,), u, rewards, transform, logit_scale, gates, coef, score, N,
               u.stride(0), rewards.stride(0), transform.stride(0), gates.stride(0), coef.stride(0), temperature,
               BLOCK_N=triton.next_power_of_2(N))
    return gates, coef, score


def qrm_combine(u: torch.Tensor, quantiles: torch.Tensor, transform: torch.Tensor, temperature: float,
                logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """u [B, N], quantiles [B, N, Q] (any float dtype), transform [N, N], logit_scale [1] ->
    gates [B, N], rewards [B, N], score [B], reward_quantiles [B, Q], all fp32."""
    _check(u, transform, logit_scale, temperature)
    B, N = u.shape
    if quantiles.dim() != 3 or quantiles.shape[:2] != (B, N) or quantiles.stride(-1) != 1:
        raise ValueError(f"quantiles must be [{B}, {N}, Q] with a contiguous last dimension, got {tuple(quantiles.shape)}")
    Q = quantiles.shape[2]
    gates = torch.empty(B, N, dtype=torch.float32, device=u.device)
    rewards = torch.empty_like(gates)
    score = torch.empty(B, dtype=torch.float32, device=u.device)
    mixture = torch.empty(B, Q, dtype=torch.float32, device=u.device)
    if B:
        launch(_qrm_combine_kernel, (B,), u, quantiles, transform, logit_scale, gates, rewards, score, mixture,
               N, Q, u.stride(0), quantiles.stride(0), quantiles.stride(1), transform.stride(0), gates.stride(0),
               rewards.stride(0), mixture.stride(0), temperature,
               BLOCK_N=triton.next_power_of_2(N), BLOCK_Q=triton.next_power_of_2(Q))
    return gates, rewards, score, mixture
