"""The FP8 backbone (quantization="fp8"): which layers are quantized, the quantized linear, and the
function that quantizes a loaded backbone in place.

Weights: e4m3 with one fp32 scale per output channel (a row of W), quantized once at load by the
same rule as the activations (kernels/fp8_quant.py). Activations: e4m3 per token, dynamically, by
the op that produces them (fused into the RMSNorm before qkv_proj and gate_up_proj, and into
SiLU*up before down_proj; a plain per-token op before o_proj). GEMMs: torch._scaled_mm with
row-wise scales (scale_a [T, 1] per token, scale_b [1, N] per channel), fp32 accumulation, output
and bias in bf16. Everything else stays in the model dtype: embed_tokens, every RMSNorm weight
and the residual stream, RoPE, QK-norm, attention itself, the final norm and the head.

torch._scaled_mm's constraints, read from its sources (aten/src/ATen/native/cuda/ScaledBlas.cpp and
Blas.cpp; torch 2.11 on the GPU image, 2.13 on CPU): CUDA needs compute capability 8.9+ (Ada,
Hopper; sm_90 with cuBLAS >= 12.9 runs cuBLASLt, older stacks a CUTLASS kernel), operand A
row-major and B column-major (we pass W.t() of a row-major [N, K] W), K and N multiples of 16,
fp32 scales contiguous, a bf16 bias with a bf16 output. On CPU (2.13) it dequantizes both operands
to fp32, multiplies, adds the bias and rounds once: no shape constraints, but slow.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..kernels.fp8_quant import TORCH_FP8_OPS, Fp8Ops, per_token_quant_fp8_ref
from .decoder import MLP, Backbone, RMSNorm

QUANTIZATIONS = ("fp8",)

# The one table: every GEMM that runs in FP8, inside each decoder layer -> the op that quantizes its
# input (the module that produces it; "per-token" is a separate quantization of the attention output).
QUANTIZED = {
    "self_attn.qkv_proj": "input_layernorm",              # fused (add +) RMSNorm + quant
    "self_attn.o_proj": "per-token",                      # attention output, quantized alone
    "mlp.gate_up_proj": "post_attention_layernorm",       # fused add + RMSNorm + quant
    "mlp.down_proj": "mlp",                               # fused SiLU*up + quant
}


class QuantizedRows(NamedTuple):
    """Activations ready for an Fp8Linear: q [T, K] float8_e4m3fn, scale [T, 1] fp32 (x ~= q * scale)."""
    q: torch.Tensor
    scale: torch.Tensor


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W in e4m3 (per-output-channel scales) and x quantized per token.
    forward takes QuantizedRows (from a fused op) or a plain [T, K] tensor (quantized here)."""
    quant_ops: Fp8Ops = TORCH_FP8_OPS

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = per_token_quant_fp8_ref(linear.weight.data)    # a row of W is an output channel
        self.weight = nn.Parameter(q, requires_grad=False)        # [N, K] e4m3, row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())   # [1, N] fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if not isinstance(x, QuantizedRows):
            x = QuantizedRows(*self.quant_ops.per_token_quant(x))
        return torch._scaled_mm(x.q, self.weight.t(), scale_a=x.scale, scale_b=self.weight_scale,
                                bias=self.bias, out_dtype=self.out_dtype)


class Fp8RMSNorm(nn.Module):
    """RMSNorm (+ residual add) whose output is quantized per token in the same op:
    forward(x, residual) -> (QuantizedRows of norm(residual + x), residual + x)."""
    quant_ops: Fp8Ops = TORCH_FP8_OPS

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[QuantizedRows, torch.Tensor]:
        if residual is None:
            return QuantizedRows(*self.quant_ops.rms_norm_quant(x, self.weight, self.eps)), x
        q, scale, total = self.quant_ops.add_rms_norm_quant(x, residual, self.weight, self.eps)
        return QuantizedRows(q, scale), total


class Fp8MLP(nn.Module):
    """down_proj(SiLU(gate) * up) with the activation quantized per token in the SiLU*up op
    (built from an MLP whose down_proj is already an Fp8Linear; gate_up_proj is one too, but in the
    per-GEMM ablation, where it may stay a model-dtype linear fed a plain tensor)."""
    quant_ops: Fp8Ops = TORCH_FP8_OPS

    def __init__(self, mlp: MLP):
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, x: QuantizedRows | torch.Tensor) -> torch.Tensor:
        return self.down_proj(QuantizedRows(*self.quant_ops.silu_mul_quant(self.gate_up_proj(x))))


# The modules that produce the quantized inputs of QUANTIZED (its right-hand column, but "per-token",
# which Fp8Linear does itself) -> their quantizing replacement.
_PRODUCERS = {"input_layernorm": Fp8RMSNorm, "post_attention_layernorm": Fp8RMSNorm, "mlp": Fp8MLP}
assert set(_PRODUCERS) == set(QUANTIZED.values()) - {"per-token"}


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError where the FP8 backbone cannot run: not bf16, a GPU before sm_89, or a torch
    whose _scaled_mm lacks row-wise scales on this device (probed once with a 16x16 product)."""
    if dtype != torch.bfloat16:
        raise ValueError(f"quantization='fp8' runs in bfloat16 (its GEMMs output bf16); the model dtype is {dtype}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = "%d.%d" % torch.cuda.get_device_capability(device)
        raise ValueError(f"quantization='fp8' needs a GPU of compute capability 8.9+ (Ada, Hopper or newer) for "
                         f"FP8 GEMMs; {torch.cuda.get_device_name(device)} is {cap}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"quantization='fp8' runs on CUDA or CPU, not {device}")
    a = torch.ones(16, 16, device=device, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"quantization='fp8': torch {torch.__version__} cannot run torch._scaled_mm with row-wise "
                         f"scales on {device} ({e})") from e


def quantize_backbone(backbone: Backbone, quantization: str, linears=tuple(QUANTIZED)) -> None:
    """Replaces, in every decoder layer, the linears in QUANTIZED by Fp8Linear (weights quantized
    here, the model-dtype weights freed) and their input ops by the quantizing ones.
    linears: a subset of QUANTIZED's keys to quantize, the others left in the model dtype, with the
    ops that feed them (bench/fp8_accuracy.py's per-GEMM ablation; the engine always quantizes all)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    unknown = set(linears) - set(QUANTIZED)
    if unknown or not linears:
        raise ValueError(f"linears must be a non-empty subset of {tuple(QUANTIZED)}, got {tuple(linears)}")
    producers = {QUANTIZED[path] for path in linears} - {"per-token"}
    for layer in backbone.layers:
        for path in linears:
            owner, name = path.split(".")
            module = getattr(layer, owner)
            linear = getattr(module, name)
            if linear.weight.is_cuda and (linear.in_features % 16 or linear.out_features % 16):
                raise ValueError(f"quantization='fp8' on CUDA needs {path}'s sizes to be multiples of 16 (torch."
                                 f"_scaled_mm), got {linear.out_features} x {linear.in_features}")
            setattr(module, name, Fp8Linear(linear))
        for name in producers:     # only a quantized linear's producer: nn.Linear takes no QuantizedRows
            setattr(layer, name, _PRODUCERS[name](getattr(layer, name)))


def use_fp8_ops(backbone: Backbone, ops: Fp8Ops) -> None:
    """Run the quantizing ops through `ops` (kernels/fp8_quant.py: csrc kernels or references)."""
    for m in backbone.modules():
        if isinstance(m, (Fp8Linear, Fp8RMSNorm, Fp8MLP)):
            m.quant_ops = ops
