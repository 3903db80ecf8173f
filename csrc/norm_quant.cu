// Residual add + RMSNorm + per-token dynamic e4m3 quantization, one block per row:
//   pass 1: total = dtype(residual + x) (written out; the next layer's residual), sum of total^2 in fp32
//   pass 2: y = dtype(weight * dtype(total * inv_rms)), the row's amax of y
//   pass 3: q = e4m3(y / scale)   (total re-read by the thread that wrote it: L1/L2-hot)
// Cast points are Hugging Face LlamaRMSNorm's (kernels/rmsnorm.py): statistics in fp32, the
// normalised row rounded to the model dtype before the weight, the product rounded again; the
// quantization then sees exactly the bf16 row the unquantized model would have fed its GEMM.
// inv_rms = 1 / sqrt(sum / cols + eps) with IEEE division and square root (torch's CPU rsqrt).
#include "fp8_common.cuh"
#include "ops.h"

namespace rmserve {
namespace {

template <typename T, int VEC, bool HAS_RESIDUAL>
__global__ void rms_norm_quant_fp8_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ residual,
                                          int64_t residual_stride, const T* __restrict__ weight, T* total,
                                          int64_t total_stride, __nv_fp8_storage_t* __restrict__ q, int64_t q_stride,
                                          float* __restrict__ scales, int64_t cols, float eps) {
  using P = Pack<T, VEC>;
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const P* in = reinterpret_cast<const P*>(x + row * x_stride);
  const P* w = reinterpret_cast<const P*>(weight);
  // the normalised input: the sum when there is a residual, else x itself
  P* sum_out = HAS_RESIDUAL ? reinterpret_cast<P*>(total + row * total_stride) : nullptr;
  const P* t_in = HAS_RESIDUAL ? sum_out : in;
  auto* out = reinterpret_cast<Fp8Pack<VEC>*>(q + row * q_stride);
  const int64_t n = cols / VEC;

  float sumsq = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    P t = in[i];
    if constexpr (HAS_RESIDUAL) {
      const P r = reinterpret_cast<const P*>(residual + row * residual_stride)[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) t.v[j] = Num<T>::store(Num<T>::load(r.v[j]) + Num<T>::load(t.v[j]));
      sum_out[i] = t;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = Num<T>::load(t.v[j]);
      sumsq += f * f;
    }
  }
  const float mean = __fdiv_rn(block_reduce(sumsq, SumOp{}, shared), static_cast<float>(cols));
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(mean + eps));

  const auto values = [&](int64_t i, float (&y)[VEC]) {
    const P t = t_in[i], wv = w[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = round_to<T>(Num<T>::load(wv.v[j]) * round_to<T>(Num<T>::load(t.v[j]) * inv));
  };
  write_quantized<VEC>(row_amax<VEC>(n, values), n, values, scales + row, out, shared);
}

template <typename T, int VEC>
void launch_vec(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride, const T* weight, T* total,
                int64_t total_stride, __nv_fp8_storage_t* q, int64_t q_stride, float* scales, int64_t rows, int64_t cols,
                float eps, cudaStream_t stream) {
  const int threads = threads_for(cols / VEC);
  if (residual != nullptr) {
    rms_norm_quant_fp8_kernel<T, VEC, true><<<rows, threads, 0, stream>>>(
        x, x_stride, residual, residual_stride, weight, total, total_stride, q, q_stride, scales, cols, eps);
  } else {
    rms_norm_quant_fp8_kernel<T, VEC, false><<<rows, threads, 0, stream>>>(
        x, x_stride, nullptr, 0, weight, nullptr, 0, q, q_stride, scales, cols, eps);
  }
}

template <typename T>
cudaError_t launch(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride, const void* weight,
                   void* total, int64_t total_stride, uint8_t* q, int64_t q_stride, float* scales, int64_t rows,
                   int64_t cols, float eps, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  bool vec = cols % V == 0 && x_stride % V == 0 && q_stride % V == 0 && aligned(x, 16) && aligned(weight, 16) &&
             aligned(q, V);
  if (residual != nullptr) {
    vec = vec && residual_stride % V == 0 && total_stride % V == 0 && aligned(residual, 16) && aligned(total, 16);
  }
  const auto* xt = static_cast<const T*>(x);
  const auto* rt = static_cast<const T*>(residual);
  const auto* wt = static_cast<const T*>(weight);
  auto* tt = static_cast<T*>(total);
  auto* qt = reinterpret_cast<__nv_fp8_storage_t*>(q);
  if (vec) {
    launch_vec<T, V>(xt, x_stride, rt, residual_stride, wt, tt, total_stride, qt, q_stride, scales, rows, cols, eps, stream);
  } else {
    launch_vec<T, 1>(xt, x_stride, rt, residual_stride, wt, tt, total_stride, qt, q_stride, scales, rows, cols, eps, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm_quant_fp8(DType dtype, const void* x, int64_t x_stride, const void* residual,
                               int64_t residual_stride, const void* weight, void* total, int64_t total_stride,
                               uint8_t* q, int64_t q_stride, float* scales, int64_t rows, int64_t cols, float eps,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(x, x_stride, residual, residual_stride, weight, total, total_stride, q, q_stride, scales,
                           rows, cols, eps, stream);
    case DType::kFloat16:
      return launch<__half>(x, x_stride, residual, residual_stride, weight, total, total_stride, q, q_stride, scales,
                            rows, cols, eps, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, x_stride, residual, residual_stride, weight, total, total_stride, q, q_stride,
                                   scales, rows, cols, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rmserve
