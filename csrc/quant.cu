// Per-token dynamic e4m3 quantization of activation rows (the attention output before o_proj).
// One block per row: pass 1 finds the row's amax, pass 2 writes q = e4m3(x / scale).
#include "fp8_common.cuh"
#include "ops.h"

namespace rmserve {
namespace {

template <typename T, int VEC>
__global__ void per_token_quant_fp8_kernel(const T* __restrict__ x, int64_t x_stride, __nv_fp8_storage_t* __restrict__ q,
                                           int64_t q_stride, float* __restrict__ scales, int64_t cols) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const auto* in = reinterpret_cast<const Pack<T, VEC>*>(x + row * x_stride);
  auto* out = reinterpret_cast<Fp8Pack<VEC>*>(q + row * q_stride);
  const int64_t n = cols / VEC;

  const auto values = [&](int64_t i, float (&y)[VEC]) {
    const Pack<T, VEC> p = in[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = Num<T>::load(p.v[j]);
  };
  write_quantized<VEC>(row_amax<VEC>(n, values), n, values, scales + row, out, shared);
}

template <typename T>
cudaError_t launch(const void* x, int64_t x_stride, uint8_t* q, int64_t q_stride, float* scales, int64_t rows,
                   int64_t cols, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = cols % V == 0 && x_stride % V == 0 && q_stride % V == 0 && aligned(x, 16) && aligned(q, V);
  const auto* xt = static_cast<const T*>(x);
  auto* qt = reinterpret_cast<__nv_fp8_storage_t*>(q);
  if (vec) {
    per_token_quant_fp8_kernel<T, V><<<rows, threads_for(cols / V), 0, stream>>>(xt, x_stride, qt, q_stride, scales, cols);
  } else {
    per_token_quant_fp8_kernel<T, 1><<<rows, threads_for(cols), 0, stream>>>(xt, x_stride, qt, q_stride, scales, cols);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t per_token_quant_fp8(DType dtype, const void* x, int64_t x_stride, uint8_t* q, int64_t q_stride,
                                float* scales, int64_t rows, int64_t cols, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, x_stride, q, q_stride, scales, rows, cols, stream);
    case DType::kFloat16: return launch<__half>(x, x_stride, q, q_stride, scales, rows, cols, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, x_stride, q, q_stride, scales, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rmserve
