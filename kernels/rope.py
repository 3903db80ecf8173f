"""Rotary position embedding (HF Llama's rotate-half convention) applied in place to packed Q and K.

The kernel computes the angles itself from the token positions and the inverse frequencies
(`rmserve.model.rope.inv_freq`, llama3-scaled when the config says so), as Hugging Face does:
angle = float32(position) * inv_freq in fp32. It reduces the angle modulo 2 pi in fp64 before
cos/sin, so GPU cos/sin stay accurate at large positions. cos and sin are rounded to the
tensor dtype (HF's cast point); the rotation itself is computed in fp32 and rounded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rmserve.model.rope import apply_rope_ref, cos_sin

from .cast import round_to
from .launch import launch


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: q [T, Hq, D], k [T, Hk, D] rotated by the angles positions [T] x inv_freq [D/2]."""
    cos, sin = cos_sin(positions, inv_freq, q.dtype)
    q.copy_(apply_rope_ref(q, cos, sin))
    k.copy_(apply_rope_ref(k, cos, sin))


@triton.jit
def _rotate(ptr, t, stride_t, stride_h, n_heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    mask = (heads < n_heads)[:, None]
    p1 = ptr + t * stride_t + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, round_to(x1f * c[None, :] - x2f * s[None, :], x1.dtype), mask=mask)
    tl.store(p1 + HALF, round_to(x2f * c[None, :] + x1f * s[None, :], x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, inv_ptr, n_q, n_k, stride_qt, stride_qh, stride_kt, stride_kh,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, HALF)
    angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + cols)          # fp32, as HF
    a64 = angle.to(tl.float64)
    reduced = (a64 - tl.floor(a64 * 0.15915494309189535 + 0.5) * 6.283185307179586).to(tl.float32)
    c = round_to(tl.cos(reduced), q_ptr.dtype.element_ty).to(tl.float32)  # HF cast point
    s = round_to(tl.sin(reduced), q_ptr.dtype.element_ty).to(tl.float32)
    _rotate(q_ptr, t, stride_qt, stride_qh, n_q, c, s, HALF, BLOCK_HQ)
    _rotate(k_ptr, t, stride_kt, stride_kh, n_k, c, s, HALF, BLOCK_HK)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place, one launch: q [T, Hq, D] and k [T, Hk, D] (same float dtype; views into the fused QKV
    output are fine: only the last dimension must be contiguous), positions [T] int, inv_freq [D/2] fp32."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [T, Hq, D] and k [T, Hk, D] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    T, _, D = q.shape
    if D % 2 or (D // 2) & (D // 2 - 1):
        raise ValueError(f"head_dim must be twice a power of two, got {D}")
    if q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need the same dtype and a contiguous last dimension")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int [{T}], got {positions.dtype} {tuple(positions.shape)}")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq must be a contiguous fp32 [{D // 2}], got {inv_freq.dtype} {tuple(inv_freq.shape)}")
    if T == 0:
        return
    launch(_rope_kernel, (T,), q, k, positions, inv_freq, q.shape[1], k.shape[1], q.stride(0), q.stride(1),
           k.stride(0), k.stride(1), HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
           BLOCK_HK=triton.next_power_of_2(k.shape[1]))
