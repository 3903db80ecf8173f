"""Per-token FP8 (e4m3) quantization fused into the ops before each GEMM: the PyTorch references
(`*_ref`: the CPU path, the test oracle, the benchmark baseline) and the CUDA C++ kernels of
csrc/ (`torch.ops.rmserve.*`, built as `rmserve._C` where setup.py could build it).

The rounding, the same in both (csrc/fp8_common.cuh states it for the kernels):
    amax  = max |y| over the row, in fp32 (NaN propagates)
    scale = max(amax / 448, 2^-126)      fp32 division; the 2^-126 floor only keeps an all-zero
                                         row's scale positive (q is then all zeros)
    q     = e4m3(clamp(y / scale, -448, 448))   fp32 division, round to nearest even
where y is the row the unquantized model would feed its GEMM, rounded where PyTorch rounds it
(the model dtype after the norm, after SiLU and after the product). Every op returns
q [T, C] float8_e4m3fn and scale [T, 1] float32, the layout torch._scaled_mm's row-wise scale_a wants.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from .rmsnorm import add_rms_norm_ref, rms_norm_ref
from .silu_mul import silu_mul_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 2.0 ** -126
FP8_KERNEL_CHOICES = ("auto", "csrc", "torch")

log = logging.getLogger("rmserve")


def per_token_quant_fp8_ref(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [T, C] (any float dtype) -> (q [T, C] e4m3, scale [T, 1] fp32) with y ~= q * scale."""
    yf = y.to(torch.float32)
    amax = yf.abs().amax(dim=-1, keepdim=True)
    # divided by a tensor, not the number 448: on CUDA torch turns `t / number` into t * fp32(1 / number)
    # (ATen's div_true_kernel_cuda), which misses the IEEE quotient by an ulp for about half of all amax
    scale = torch.clamp(amax / torch.full_like(amax, FP8_MAX), min=MIN_SCALE)
    return torch.clamp(yf / scale, -FP8_MAX, FP8_MAX).to(FP8), scale


def rms_norm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_quant_fp8(rms_norm(x)): x [T, H], weight [H] -> (q [T, H], scale [T, 1])."""
    return per_token_quant_fp8_ref(rms_norm_ref(x, weight, eps))


def add_rms_norm_quant_fp8_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [T, H] -> (q [T, H], scale [T, 1], residual + x [T, H] in x's dtype)."""
    normed, total = add_rms_norm_ref(x, residual, weight, eps)
    return (*per_token_quant_fp8_ref(normed), total)


def silu_mul_quant_fp8_ref(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T, 2I] (gate then up) -> per_token_quant_fp8(silu(gate) * up): (q [T, I], scale [T, 1])."""
    return per_token_quant_fp8_ref(silu_mul_ref(gate_up))


@dataclass(frozen=True)
class Fp8Ops:
    """One implementation of every quantizing op (signatures as the `*_ref` functions)."""
    name: str                      # "csrc" or "torch"
    per_token_quant: Callable
    rms_norm_quant: Callable
    add_rms_norm_quant: Callable
    silu_mul_quant: Callable


TORCH_FP8_OPS = Fp8Ops("torch", per_token_quant_fp8_ref, rms_norm_quant_fp8_ref, add_rms_norm_quant_fp8_ref,
                       silu_mul_quant_fp8_ref)
_OP_NAMES = ("per_token_quant_fp8", "rms_norm_quant_fp8", "add_rms_norm_quant_fp8", "silu_mul_quant_fp8")
BUILD_HINT = ("build it with a CUDA build of torch and nvcc: RMSERVE_BUILD_CSRC=1 pip install -e . "
              "--no-build-isolation (see setup.py)")


def csrc_blocker() -> str | None:
    """Why the csrc ops cannot be loaded here (None: they can). Importing rmserve._C registers them."""
    try:
        from rmserve import _C  # noqa: F401
    except ImportError as e:
        return f"rmserve._C is not built ({e})"
    return None


def _register_fakes() -> None:
    """Shapes of each op's outputs for torch.compile and opcheck (the ops allocate them)."""
    def quant(x, cols=None):
        cols = x.shape[1] if cols is None else cols
        return x.new_empty((x.shape[0], cols), dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)

    torch.library.register_fake("rmserve::per_token_quant_fp8")(lambda x: quant(x))
    torch.library.register_fake("rmserve::rms_norm_quant_fp8")(lambda x, weight, eps: quant(x))
    torch.library.register_fake("rmserve::add_rms_norm_quant_fp8")(
        lambda x, residual, weight, eps: (*quant(x), torch.empty_like(x)))
    torch.library.register_fake("rmserve::silu_mul_quant_fp8")(lambda g: quant(g, g.shape[1] // 2))


_CSRC_OPS: Fp8Ops | None = None


def csrc_fp8_ops() -> Fp8Ops:
    """The csrc kernels as an Fp8Ops; raises RuntimeError (with how to build them) where they are not built."""
    global _CSRC_OPS
    if _CSRC_OPS is None:
        blocker = csrc_blocker()
        if blocker is not None:
            raise RuntimeError(f"the csrc CUDA ops are not available: {blocker}; {BUILD_HINT}")
        _register_fakes()
        ops = torch.ops.rmserve
        _CSRC_OPS = Fp8Ops("csrc", *(getattr(ops, name) for name in _OP_NAMES))
    return _CSRC_OPS


def select_fp8_ops(name: str, device: torch.device) -> Fp8Ops:
    """Once per engine: "csrc" (CUDA only; raises where rmserve._C is not built), "torch" (the
    references, any device), or "auto" (csrc on CUDA where built, else the references, saying so)."""
    if name not in FP8_KERNEL_CHOICES:
        raise ValueError(f"quant_kernels must be one of {FP8_KERNEL_CHOICES}, got {name!r}")
    if name == "csrc" and device.type != "cuda":
        raise ValueError(f"quant_kernels='csrc' runs CUDA kernels; the device is {device}: use 'torch' or 'auto'")
    why = None
    if name == "csrc":
        ops = csrc_fp8_ops()
    elif name == "auto" and device.type == "cuda":
        why = csrc_blocker()
        ops = TORCH_FP8_OPS if why else csrc_fp8_ops()
    else:
        ops = TORCH_FP8_OPS
    impl = "csrc CUDA kernels (torch.ops.rmserve)" if ops.name == "csrc" else "PyTorch references (*_ref)"
    log.info("fp8: quantizing ops %s run as %s on %s; GEMMs: torch._scaled_mm, row-wise scales",
             ", ".join(_OP_NAMES), impl, device)
    if why:
        log.warning("fp8: the csrc CUDA ops are not built (%s), so the slower references run on CUDA; %s",
                    why, BUILD_HINT)
    return ops
