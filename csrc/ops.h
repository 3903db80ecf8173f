// Host-side launchers of the csrc kernels: plain pointers, sizes and a stream, no torch types.
// torch_bindings.cpp checks the tensors and calls these; each .cu defines its own.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace rmserve {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every op writes q [rows, cols] float8_e4m3fn (row stride q_stride bytes = elements) and
// scales [rows] fp32, with the rounding in fp8_common.cuh. Input rows have a contiguous last
// dimension and a row stride in elements. A launcher returns the launch's error code.

// x [rows, cols] -> per-token e4m3 rows.
cudaError_t per_token_quant_fp8(DType dtype, const void* x, int64_t x_stride, uint8_t* q, int64_t q_stride,
                                float* scales, int64_t rows, int64_t cols, cudaStream_t stream);

// total = residual + x (rounded to dtype; skipped when residual is null, then total is x),
// y = weight * dtype(total * rsqrt(mean(total^2) + eps)), then y's per-token e4m3 rows.
// total is written to `total` (ignored when residual is null).
cudaError_t rms_norm_quant_fp8(DType dtype, const void* x, int64_t x_stride, const void* residual,
                               int64_t residual_stride, const void* weight, void* total, int64_t total_stride,
                               uint8_t* q, int64_t q_stride, float* scales, int64_t rows, int64_t cols, float eps,
                               cudaStream_t stream);

// gate_up [rows, 2 * inter] (gate then up) -> y = dtype(dtype(silu(gate)) * up), then y's per-token e4m3 rows.
cudaError_t silu_mul_quant_fp8(DType dtype, const void* gate_up, int64_t gate_up_stride, uint8_t* q,
                               int64_t q_stride, float* scales, int64_t rows, int64_t inter, cudaStream_t stream);

}  // namespace rmserve
