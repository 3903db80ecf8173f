"""Last-token gather + every first-stage head matrix of a family, in one launch.

out[b, n] = sum_k x_s[b, k] * W[n, k] + bias[n],  x_s[b] = hidden[index_s[b]]
where output row n belongs to index set s: rows [0, rows[0]) read index 0 (the last tokens),
rows [rows[0], rows[0] + rows[1]) read index 1 (the gating tokens of ArmoRM/QRM).

An index is any list of row numbers, so the same launch gathers every step token of every
sequence of a process reward model (index 0 = the batch's step positions, B = its step count,
a variable number per sequence laid end to end): nothing in the kernel knows which sequence a
row came from, and B is the index's length, fixed when the host packs the batch (a CUDA-graph
bucket's static step slots; padding slots name row 0 and their output rows are dropped).

The hidden rows are read straight from the packed hidden-state tensor: no gathered copy goes
through memory. Cast points follow `torch.nn.functional.linear(hidden[idx].to(W.dtype), W, bias)`:
the hidden values are cast to W's dtype first (so URM's fp16 weights MLP sees fp16 inputs, QRM's
fp32 head sees exact fp32 ones), then products are accumulated in fp32 (ieee, no TF32). The output
is fp32 and NOT rounded to W's dtype; callers that follow a reference's cast points round it
(`rmserve/heads/fused.py`). The only difference to the PyTorch path is the summation order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .cast import round_to
from .launch import launch


def gather_project_ref(hidden: torch.Tensor, indices: Sequence[torch.Tensor], weight: torch.Tensor,
                       bias: torch.Tensor | None, rows: Sequence[int]) -> torch.Tensor:
    """Plain PyTorch: fp32 math on the same cast points. Returns [B, sum(rows)] fp32."""
    outs, start = [], 0
    for idx, n in zip(indices, rows):
        w = weight[start:start + n].float()
        b = None if bias is None else bias[start:start + n].float()
        outs.append(F.linear(hidden[idx].to(weight.dtype).float(), w, b))
        start += n
    return torch.cat(outs, dim=1)


# H, the hidden size, is a constexpr: each model compiles one binary for it anyway, and the loop over
# it then has a Python bound (Triton 3.6's interpreter, the GPU image's, cannot take range() over a
# runtime value with NumPy >= 2.4: triton-lang/triton#9171).
@triton.jit
def _gather_project_kernel(h_ptr, idx0_ptr, idx1_ptr, w_ptr, b_ptr, out_ptr, B, N0, N, H: tl.constexpr,
                           stride_h, stride_w, stride_out,
                           HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    # Column blocks never straddle the two index sets: the first cdiv(N0, BLOCK_N) blocks cover
    # rows [0, N0), the rest cover [N0, N).
    pid_n = tl.program_id(0)
    nb0 = tl.cdiv(N0, BLOCK_N)
    second = pid_n >= nb0
    lo = tl.where(second, N0 + (pid_n - nb0) * BLOCK_N, pid_n * BLOCK_N)
    hi = tl.where(second, N, N0)
    cols = lo + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    bs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = bs < B
    rows0 = tl.load(idx0_ptr + bs, mask=b_ok, other=0)
    rows1 = tl.load(idx1_ptr + bs, mask=b_ok, other=0)
    rows = tl.where(second, rows1, rows0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + ks) < H
        x = tl.load(h_ptr + rows[:, None] * stride_h + (k0 + ks)[None, :], mask=b_ok[:, None] & k_ok[None, :],
                    other=0.0)
        x = round_to(x.to(tl.float32), w_ptr.dtype.element_ty).to(tl.float32)   # F.linear's cast point: to W dtype
        w = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + (k0 + ks)[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(x, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + bs.to(tl.int64)[:, None] * stride_out + cols[None, :], acc,
             mask=b_ok[:, None] & col_ok[None, :])


def gather_project(hidden: torch.Tensor, indices: Sequence[torch.Tensor], weight: torch.Tensor,
                   bias: torch.Tensor | None, rows: Sequence[int]) -> torch.Tensor:
    """hidden [T, H] (any float dtype, last dim contiguous); indices: one or two int [B] tensors of
    row numbers into hidden (last tokens, then gating tokens; or a PRM's step tokens), on hidden's device;
    weight [N, H] contiguous (bf16/fp16/fp32), N = sum(rows); bias [N] or None; rows: output rows per
    index set (Python ints from the model's shapes). Returns [B, N] fp32. One launch, no host sync.
    Indices are not bounds-checked on the device (that would need a sync); they come from the packer."""
    if hidden.dim() != 2 or hidden.stride(-1) != 1:
        raise ValueError(f"hidden must be [T, H] with a contiguous last dimension, got {tuple(hidden.shape)}")
    H = hidden.shape[1]
    if not 1 <= len(indices) <= 2 or len(rows) != len(indices):
        raise ValueError("one or two index tensors, with one row count each")
    B = indices[0].shape[0]
    for idx in indices:
        if (idx.shape != (B,) or idx.dtype not in (torch.int32, torch.int64) or idx.device != hidden.device
                or not idx.is_contiguous()):   # the kernel reads idx[b] at idx_ptr + b
            raise ValueError(f"indices must be contiguous int [{B}] tensors on {hidden.device}, got {idx.dtype} "
                             f"{tuple(idx.shape)} with strides {idx.stride()}")
    N = sum(rows)
    if weight.shape != (N, H) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{N}, {H}], got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{N}], got {tuple(bias.shape)}")
    out = torch.empty(B, N, dtype=torch.float32, device=hidden.device)
    if B == 0 or N == 0:
        return out
    block_b = 16 if B <= 16 else 32
    block_n, block_k = 32, 64
    n0 = rows[0]
    grid = (triton.cdiv(n0, block_n) + triton.cdiv(N - n0, block_n), triton.cdiv(B, block_b))
    idx1 = indices[1] if len(indices) == 2 else indices[0]
    launch(_gather_project_kernel, grid, hidden, indices[0], idx1, weight, bias if bias is not None else weight,
           out, B, n0, N, H, hidden.stride(0), weight.stride(0), out.stride(0),
           HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
