"""Which implementation of each fused op the engine uses, chosen once at construction.

`select_kernels(name, device)`:
- "auto":   the Triton kernels on CUDA, the plain-PyTorch references elsewhere.
- "triton": the Triton kernels. On CPU only under Triton's interpreter (TRITON_INTERPRET=1 set
            before rmserve is imported; slow, for tests); otherwise it raises.
- "torch":  the PyTorch references (`*_ref`), on any device.
Nothing falls back silently: asking for a path that cannot run raises.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import gate_combine, gather_project, rmsnorm, rope, sampling, silu_mul

KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Ops:
    """One implementation of every fused op; see each kernel file for shapes and dtypes."""
    name: str                      # "triton" or "torch"
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable                 # in place on q, k
    qk_norm_rope: Callable         # in place on q, k: per-head RMSNorm (Qwen3), then RoPE
    silu_mul: Callable
    gather_project: Callable
    armo_combine: Callable
    qrm_combine: Callable
    sample_normal: Callable
    sample_quantiles: Callable


# Each op's kernel module and function; its PyTorch reference is the same name + "_ref" beside it.
_KERNELS = {"rms_norm": rmsnorm, "add_rms_norm": rmsnorm, "rope": rope, "qk_norm_rope": rope, "silu_mul": silu_mul,
            "gather_project": gather_project, "armo_combine": gate_combine, "qrm_combine": gate_combine,
            "sample_normal": sampling, "sample_quantiles": sampling}


def _ops(name: str, suffix: str) -> Ops:
    return Ops(name=name, **{op: getattr(module, op + suffix) for op, module in _KERNELS.items()})


TORCH_OPS = _ops("torch", "_ref")
TRITON_OPS = _ops("triton", "")


def interpreting() -> bool:
    """True when the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rmsnorm._rms_norm_kernel, InterpretedFunction)


def select_kernels(name: str, device: torch.device) -> Ops:
    if name not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {name!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TORCH_OPS
    if device.type == "cuda":
        if interpreting():
            raise ValueError("kernels='triton' on CUDA, but TRITON_INTERPRET=1 made the kernels interpreted; "
                               "unset it to run them on the GPU")
        return TRITON_OPS
    if device.type == "cpu" and interpreting():
        return TRITON_OPS
    hint = ("TRITON_INTERPRET=1 is set, but only after rmserve's kernels were imported; set it before "
            "importing rmserve" if os.environ.get("TRITON_INTERPRET") == "1" else
            "set TRITON_INTERPRET=1 before importing rmserve to run them in Triton's (slow) CPU interpreter")
    raise ValueError(f"kernels='triton' needs a CUDA device, not {device}; use kernels='torch' or 'auto', or {hint}")
