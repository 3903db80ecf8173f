"""Causal GQA attention over packed sequences (`cu_seqlens`), behind one function.

Backends, chosen once by `select_attention`:
- "flash_attn":   flash-attn's `flash_attn_varlen_func` (CUDA, optional extra `flash`).
- "torch_varlen": PyTorch's own varlen FlashAttention (`torch.nn.attention.varlen.varlen_attn`, CUDA).
- "reference":    per-sequence SDPA with `enable_gqa`; runs anywhere, the CPU path and test oracle.

Every backend takes q [Tq, Hq, D], k/v [Tk, Hkv, D] and cumulative lengths, and returns
[Tq, Hq, D]. When a sequence has more keys than queries (a shared prefix in front of it),
the causal mask is aligned bottom-right: query i of a sequence with Lq queries and Lk keys
sees keys 0 .. Lk - Lq + i.
"""
from __future__ import annotations

import importlib.util
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]
BACKENDS = ("flash_attn", "torch_varlen", "reference")
# Samples in one batch, at most. FlashAttention's varlen forward (flash-attn's and PyTorch's copy of it)
# launches grid (query blocks, sequences, heads), and CUDA's grid y-dimension stops at 65,535; a
# shared-prompt batch hands attention up to two sequences a sample (each prompt segment and member).
MAX_BATCH_SEQS = 65_535 // 2


def attention_ref(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        lq, lk = q1 - q0, k1 - k0
        if lq == lk:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # bottom-right causal: query row r sees keys up to r + lk - lq (one broadcast compare)
            rows = torch.arange(lk - lq, lk, device=q.device)
            mask = torch.arange(lk, device=q.device) <= rows[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def _torch_varlen() -> AttentionFn:
    """PyTorch's varlen FlashAttention, whose signature moved between releases:
    2.9/2.10 `is_causal=`; 2.11 keyword-only `scale=` and `window_size=(-1, 0)` for causal, K/V
    handed straight to aten's FlashAttention, which does GQA natively (Hq a multiple of Hkv);
    2.12+ the same plus a head-count check that `enable_gqa=True` lifts. K/V are never repeated.
    Capturable in a CUDA graph: max_q/max_k are python ints and nothing reads cu_seqlens on the host."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    has_scale = "scale" in params
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}

    def fn(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        if has_scale:
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **causal, **gqa)
        # A varlen_attn without `scale` applies 1/sqrt(head_dim): Llama's own scale (python floats,
        # no sync); any other scale cannot be honoured.
        if scale != q.shape[-1] ** -0.5:
            raise RuntimeError(f"this torch's varlen_attn takes no scale and applies 1/sqrt({q.shape[-1]}), "
                               f"not {scale}; use attention='reference' or another torch")
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **causal, **gqa)

    return fn


def _flash_attn() -> AttentionFn:
    from flash_attn import flash_attn_varlen_func

    def fn(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True)

    return fn


FLASH_DTYPES = (torch.float16, torch.bfloat16)   # FlashAttention (both CUDA backends) has no fp32 kernels


def available_backends(device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run on `device` for q/k/v of `dtype` (None: any dtype)."""
    found = ["reference"]
    if device.type == "cuda" and (dtype is None or dtype in FLASH_DTYPES):
        if importlib.util.find_spec("flash_attn") is not None:
            found.insert(0, "flash_attn")
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            found.insert(len(found) - 1, "torch_varlen")
        except ImportError:
            pass
    return found


def select_attention(name: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, AttentionFn]:
    """'auto' picks the first available of flash_attn, torch_varlen, reference (for fp32 on CUDA:
    reference, FlashAttention has no fp32 kernels).

    Asking for a backend that this device and dtype cannot run raises; nothing falls back silently."""
    found = available_backends(device, dtype)
    if name == "auto":
        name = found[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}', expected one of {BACKENDS} or 'auto'")
    if name not in found:
        on = device if dtype is None else f"{device} in {str(dtype).replace('torch.', '')}"
        raise ValueError(f"attention backend '{name}' is not available on {on} (available: {found})")
    fn = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen}.get(name, lambda: attention_ref)()
    return name, fn
