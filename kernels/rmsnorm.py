"""RMSNorm, optionally fused with the residual add before it, in one pass over memory.

Numerics follow Hugging Face's LlamaRMSNorm: the sum `x + residual` is rounded to the input dtype
(as PyTorch's add is), the statistics are taken in fp32, the normalised row is cast back to the
input dtype, and only then multiplied by the weight (one more rounding to the input dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cast import round_to
from .launch import launch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: statistics in fp32, scale applied after casting back."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x)."""
    total = residual + x
    return rms_norm_ref(total, weight, eps), total


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, eps,
                     stride_x, stride_res, stride_out, stride_sum,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = round_to(r.to(tl.float32) + x.to(tl.float32), x.dtype)     # rounded like torch's add
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = round_to(xf * inv, x.dtype).to(tl.float32)                   # cast back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_to(w * y, out_ptr.dtype.element_ty), mask=mask)


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, H] with a contiguous last dimension, got shape {tuple(x.shape)}")
    T, H = x.shape
    if weight.shape != (H,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{H}], got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError("residual must match x in shape and dtype, with a contiguous last dimension")
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else out
    res = residual if residual is not None else x
    block = triton.next_power_of_2(H)
    if T > 0:
        launch(_rms_norm_kernel, (T,), x, res, weight, out, total, H, eps, x.stride(0), res.stride(0),
               out.stride(0), total.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block,
               num_warps=min(max(block // 256, 1), 16))
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (bf16/fp16/fp32, last dim contiguous), weight [H] same dtype -> [T, H] in x's dtype."""
    return _rms_norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T, H] same dtype; weight [H] -> (rms_norm(residual + x), residual + x), both new tensors."""
    return _rms_norm(x, residual, weight, eps)
