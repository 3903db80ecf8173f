// Device code shared by the FP8 kernels: the e4m3 rounding rule, the per-row scale rule, block
// reductions and 16-byte vector access. CUDA's own headers only (no torch).
//
// The rounding every kernel here applies, and the PyTorch references in kernels/fp8_quant.py
// apply the same way (that file is the specification; tests hold the kernels to it):
//   amax  = max |y| over the row, in fp32 (NaN propagates: a row holding NaN gets a NaN scale)
//   scale = max(amax / 448, 2^-126)            IEEE fp32 division; 2^-126 (FLT_MIN) only guards
//                                              rows with amax < 448 * 2^-126, i.e. all-zero rows
//   q     = e4m3(y / scale)                    IEEE fp32 division, round to nearest even,
//                                              saturated to +-448 (cvt.rn.satfinite)
// so y ~= q * scale, and the row's largest element maps to +-448.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

namespace rmserve {

constexpr float kFp8Max = 448.0f;               // largest finite float8_e4m3fn
constexpr float kMinScale = 1.17549435082e-38f;  // 2^-126

// Conversions of the three activation dtypes to and from fp32, rounding to nearest even.
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// x rounded to T and back: where PyTorch stores an intermediate in the model dtype.
template <typename T> __device__ __forceinline__ float round_to(float x) { return Num<T>::load(Num<T>::store(x)); }

// VEC elements of T moved as one load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
template <int VEC> struct alignas(VEC) Fp8Pack { __nv_fp8_storage_t v[VEC]; };

// max that keeps NaN (fmaxf drops it; torch.amax keeps it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// kIdentity: what the lanes past the last warp contribute to the second stage of block_reduce.
struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  static constexpr float kIdentity = 0.0f;  // the maxima reduced here are of |y| (>= 0, or NaN)
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};

// Reduce one float per thread over the block; every thread gets the result. `shared` holds 32 floats.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // `shared` may still be read from a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : Op::kIdentity;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

__device__ __forceinline__ float row_scale(float amax) { return nan_max(__fdiv_rn(amax, kFp8Max), kMinScale); }

// Quantize VEC fp32 values (two at a time through cvt.rn.satfinite.e4m3x2 on sm_89+) into `out`.
template <int VEC>
__device__ __forceinline__ void quantize(const float (&y)[VEC], float scale, Fp8Pack<VEC>& out) {
  if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const __nv_fp8x2_storage_t two = __nv_cvt_float2_to_fp8x2(
          make_float2(__fdiv_rn(y[j], scale), __fdiv_rn(y[j + 1], scale)), __NV_SATFINITE, __NV_E4M3);
      out.v[j] = static_cast<__nv_fp8_storage_t>(two & 0xff);       // the low byte holds the first value
      out.v[j + 1] = static_cast<__nv_fp8_storage_t>(two >> 8);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = __nv_cvt_float_to_fp8(__fdiv_rn(y[j], scale), __NV_SATFINITE, __NV_E4M3);
  }
}

// The two passes every kernel here ends with, over a row of n vectors whose VEC values
// `values(i, y)` computes (from the inputs, so the second pass recomputes rather than stores):
// the row's amax, then its scale (reduced over the block) and q for each vector.
template <int VEC, typename Values>
__device__ __forceinline__ float row_amax(int64_t n, const Values& values) {
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float y[VEC];
    values(i, y);
#pragma unroll
    for (int j = 0; j < VEC; ++j) amax = nan_max(amax, fabsf(y[j]));
  }
  return amax;
}

template <int VEC, typename Values>
__device__ __forceinline__ void write_quantized(float amax, int64_t n, const Values& values, float* __restrict__ scale_out,
                                                Fp8Pack<VEC>* __restrict__ out, float* shared) {
  const float scale = row_scale(block_reduce(amax, MaxOp{}, shared));
  if (threadIdx.x == 0) *scale_out = scale;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float y[VEC];
    values(i, y);
    Fp8Pack<VEC> o;
    quantize<VEC>(y, scale, o);
    out[i] = o;
  }
}

// Threads per row: one 16-byte vector each where the row allows, at most 1024.
inline int threads_for(int64_t vectors) {
  int64_t t = ((vectors + 31) / 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

inline bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace rmserve
