"""Round-to-nearest-even casts that behave the same on the GPU and in Triton's CPU interpreter.

The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even), which would make every
bf16 kernel output differ from PyTorch's by up to one bf16 ulp on CPU. `round_to` rounds the fp32
bits to nearest even first, so the following cast is exact on both.
"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even (bf16 by bit arithmetic; NaN and inf are kept)."""
    if tl.constexpr(dtype == tl.bfloat16):
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = x != x
        x = tl.where(is_nan, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)
