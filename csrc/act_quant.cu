// SiLU(gate) * up + per-token dynamic e4m3 quantization of Llama's fused gate/up output, one
// block per row: pass 1 computes y and the row's amax, pass 2 recomputes y (its inputs are
// L2-hot) and writes q = e4m3(y / scale). y rounds where PyTorch's F.silu(gate) * up does:
// silu in fp32 (g / (1 + expf(-g)), IEEE division) rounded to the dtype, the product in fp32
// rounded to the dtype (kernels/silu_mul.py's silu_mul_ref).
#include "fp8_common.cuh"
#include "ops.h"

namespace rmserve {
namespace {

template <typename T>
__device__ __forceinline__ float silu_mul(T g, T u) {
  const float gf = Num<T>::load(g);
  return round_to<T>(round_to<T>(__fdiv_rn(gf, 1.0f + expf(-gf))) * Num<T>::load(u));
}

template <typename T, int VEC>
__global__ void silu_mul_quant_fp8_kernel(const T* __restrict__ gate_up, int64_t stride, __nv_fp8_storage_t* __restrict__ q,
                                          int64_t q_stride, float* __restrict__ scales, int64_t inter) {
  using P = Pack<T, VEC>;
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const P* gate = reinterpret_cast<const P*>(gate_up + row * stride);
  const P* up = reinterpret_cast<const P*>(gate_up + row * stride + inter);
  auto* out = reinterpret_cast<Fp8Pack<VEC>*>(q + row * q_stride);
  const int64_t n = inter / VEC;

  const auto values = [&](int64_t i, float (&y)[VEC]) {
    const P g = gate[i], u = up[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = silu_mul<T>(g.v[j], u.v[j]);
  };
  write_quantized<VEC>(row_amax<VEC>(n, values), n, values, scales + row, out, shared);
}

template <typename T>
cudaError_t launch(const void* gate_up, int64_t stride, uint8_t* q, int64_t q_stride, float* scales, int64_t rows,
                   int64_t inter, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = inter % V == 0 && stride % V == 0 && q_stride % V == 0 && aligned(gate_up, 16) && aligned(q, V);
  const auto* gt = static_cast<const T*>(gate_up);
  auto* qt = reinterpret_cast<__nv_fp8_storage_t*>(q);
  if (vec) {
    silu_mul_quant_fp8_kernel<T, V><<<rows, threads_for(inter / V), 0, stream>>>(gt, stride, qt, q_stride, scales, inter);
  } else {
    silu_mul_quant_fp8_kernel<T, 1><<<rows, threads_for(inter), 0, stream>>>(gt, stride, qt, q_stride, scales, inter);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t silu_mul_quant_fp8(DType dtype, const void* gate_up, int64_t gate_up_stride, uint8_t* q,
                               int64_t q_stride, float* scales, int64_t rows, int64_t inter, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch<float>(gate_up, gate_up_stride, q, q_stride, scales, rows, inter, stream);
    case DType::kFloat16: return launch<__half>(gate_up, gate_up_stride, q, q_stride, scales, rows, inter, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(gate_up, gate_up_stride, q, q_stride, scales, rows, inter, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rmserve
