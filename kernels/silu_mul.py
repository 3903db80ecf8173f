"""SiLU(gate) * up of Llama's fused gate/up projection, in one pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .cast import round_to
from .launch import launch


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up) -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, round_to(y, out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (any float dtype, last dim contiguous) -> [T, I] in the same dtype.
    Computed in fp32 and rounded once (the PyTorch path rounds after SiLU and after the product)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [T, 2I] with a contiguous last dimension, got {tuple(gate_up.shape)}")
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(triton.next_power_of_2(inter), 1024)
    if T > 0:
        launch(_silu_mul_kernel, (T, triton.cdiv(inter, block)), gate_up, out, inter, gate_up.stride(0),
               out.stride(0), BLOCK=block)
    return out
