"""Rotary position embedding (HF Llama's rotate-half convention) applied in place to packed Q and K,
optionally after Qwen3's per-head RMSNorm of q and k (`qk_norm_rope`): the kernel already reads
each head row of q and k, so normalising it in the same pass saves a read and a write of Q and K
per layer.

The kernel computes the angles itself from the token positions and the inverse frequencies
(`rmserve.model.rope.inv_freq`, llama3-scaled when the config says so), as Hugging Face does:
angle = float32(position) * inv_freq in fp32. It reduces the angle modulo 2 pi in fp64 before
cos/sin, so GPU cos/sin stay accurate at large positions. cos and sin are rounded to the
tensor dtype (HF's cast point); the rotation itself is computed in fp32 and rounded once.
The QK norm keeps Qwen3RMSNorm's cast points (transformers' modeling_qwen3.py): statistics in
fp32 over head_dim, the normalised row cast back to the input dtype, then times the weight
(rounded to the dtype again), and RoPE applied to that rounded result.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rmserve.model.rope import apply_rope_ref, cos_sin

from .cast import round_to
from .launch import launch
from .rmsnorm import rms_norm_ref


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: q [T, Hq, D], k [T, Hk, D] rotated by the angles positions [T] x inv_freq [D/2]."""
    cos, sin = cos_sin(positions, inv_freq, q.dtype)
    q.copy_(apply_rope_ref(q, cos, sin))
    k.copy_(apply_rope_ref(k, cos, sin))


def qk_norm_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                     q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float) -> None:
    """In place: each head row of q and k RMS-normalised over head_dim (HF Qwen3RMSNorm) with
    q_weight / k_weight [D], then rotated as `rope_ref`."""
    q.copy_(rms_norm_ref(q, q_weight, eps))
    k.copy_(rms_norm_ref(k, k_weight, eps))
    rope_ref(q, k, positions, inv_freq)


@triton.jit
def _rotate(ptr, w_ptr, t, stride_t, stride_h, n_heads, c, s, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            QK_NORM: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = (heads < n_heads)[:, None]
    p1 = ptr + t * stride_t + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    if QK_NORM:   # per head: fp32 statistics, cast back to the dtype, times the weight, rounded again
        inv = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols).to(tl.float32)
        x1f = round_to(w1[None, :] * round_to(x1f * inv[:, None], x1.dtype).to(tl.float32), x1.dtype).to(tl.float32)
        x2f = round_to(w2[None, :] * round_to(x2f * inv[:, None], x1.dtype).to(tl.float32), x1.dtype).to(tl.float32)
    tl.store(p1, round_to(x1f * c[None, :] - x2f * s[None, :], x1.dtype), mask=mask)
    tl.store(p1 + HALF, round_to(x2f * c[None, :] + x1f * s[None, :], x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, inv_ptr, qw_ptr, kw_ptr, eps, n_q, n_k, stride_qt, stride_qh, stride_kt,
                 stride_kh, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 QK_NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)
    angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + cols)          # fp32, as HF
    a64 = angle.to(tl.float64)
    reduced = (a64 - tl.floor(a64 * 0.15915494309189535 + 0.5) * 6.283185307179586).to(tl.float32)
    c = round_to(tl.cos(reduced), q_ptr.dtype.element_ty).to(tl.float32)  # HF cast point
    s = round_to(tl.sin(reduced), q_ptr.dtype.element_ty).to(tl.float32)
    _rotate(q_ptr, qw_ptr, t, stride_qt, stride_qh, n_q, c, s, eps, HALF, BLOCK_HQ, QK_NORM)
    _rotate(k_ptr, kw_ptr, t, stride_kt, stride_kh, n_k, c, s, eps, HALF, BLOCK_HK, QK_NORM)


def _launch(q, k, positions, inv_freq, weights, eps: float) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, Hq, D] and k [T, Hk, D] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    T, _, D = q.shape
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"head_dim must be twice a power of two, got {D}")
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need the same dtype and a contiguous last dimension")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64) or not positions.is_contiguous():
        raise ValueError(f"positions must be a contiguous int [{T}], got {positions.dtype} {tuple(positions.shape)} "
                         f"with strides {positions.stride()}")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq must be a contiguous fp32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    for w in weights:
        if w.shape != (D,) or w.dtype != q.dtype or not w.is_contiguous():
            raise ValueError(f"q/k norm weights must be contiguous [{D}] in {q.dtype}, got {w.dtype} {tuple(w.shape)}")
    if T == 0:
        return
    qw, kw = weights or (q, k)   # unread without the norm
    launch(_rope_kernel, (T,), q, k, positions, inv_freq, qw, kw, eps, q.shape[1], k.shape[1], q.stride(0),
           q.stride(1), k.stride(0), k.stride(1), HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
           BLOCK_HK=triton.next_power_of_2(k.shape[1]), QK_NORM=bool(weights))


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place, one launch: q [T, Hq, D] and k [T, Hk, D] (same float dtype; views into the fused QKV
    output are fine: only the last dimension must be contiguous), positions [T] int, inv_freq [D/2] fp32."""
    _launch(q, k, positions, inv_freq, (), 0.0)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float) -> None:
    """In place, one launch: `rope` after a per-head RMSNorm of q and k over head_dim; q_weight and
    k_weight [D] contiguous, in q's dtype. Shapes and dtypes otherwise as `rope`."""
    _launch(q, k, positions, inv_freq, (q_weight, k_weight), eps)
