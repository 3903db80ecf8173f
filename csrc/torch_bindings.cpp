// The PyTorch binding of the csrc kernels: every op's schema (one TORCH_LIBRARY block, so each op
// is registered once, when `rmserve._C` is imported), its CUDA implementation, and the input
// checks. The ops allocate their outputs with the caching allocator and launch on the current
// stream without a host sync, so CUDA graphs capture them.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace {

using at::Tensor;
using rmserve::DType;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// [rows, cols] on CUDA with a contiguous last dimension.
void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [tokens, features], got ", t.dim(), " dimensions");
  TORCH_CHECK(t.size(1) > 0 && t.size(1) < (int64_t{1} << 31), name, " must have 1 to 2^31 - 1 features, got ",
              t.size(1));
  TORCH_CHECK(t.stride(1) == 1, name, " must have a contiguous last dimension, got strides ", t.strides());
  // one block per row on grid x (at most 2^31 - 1); the launchers' int64 row count would otherwise be
  // narrowed to the grid's unsigned int, silently skipping rows past 2^32
  TORCH_CHECK(t.size(0) < (int64_t{1} << 31), name, " must have at most 2^31 - 1 rows, got ", t.size(0));
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must be ", x.scalar_type(), " like x, got ", t.scalar_type());
}

std::tuple<Tensor, Tensor> quant_outputs(const Tensor& x, int64_t cols) {
  return {at::empty({x.size(0), cols}, x.options().dtype(at::kFloat8_e4m3fn)),
          at::empty({x.size(0), 1}, x.options().dtype(at::kFloat))};
}

uint8_t* bytes(const Tensor& q) { return static_cast<uint8_t*>(q.data_ptr()); }

std::tuple<Tensor, Tensor> per_token_quant_fp8(const Tensor& x) {
  check_rows(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [q, scale] = quant_outputs(x, x.size(1));
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(rmserve::per_token_quant_fp8(dtype_of(x, "x"), x.data_ptr(), x.stride(0), bytes(q), q.stride(0),
                                                scale.data_ptr<float>(), x.size(0), x.size(1),
                                                c10::cuda::getCurrentCUDAStream()));
  }
  return {q, scale};
}

void check_weight(const Tensor& weight, const Tensor& x) {
  check_like(weight, x, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be a contiguous [", x.size(1), "], got ", weight.sizes());
}

std::tuple<Tensor, Tensor> rms_norm_quant_fp8(const Tensor& x, const Tensor& weight, double eps) {
  check_rows(x, "x");
  check_weight(weight, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [q, scale] = quant_outputs(x, x.size(1));
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(rmserve::rms_norm_quant_fp8(dtype_of(x, "x"), x.data_ptr(), x.stride(0), nullptr, 0,
                                               weight.data_ptr(), nullptr, 0, bytes(q), q.stride(0),
                                               scale.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps),
                                               c10::cuda::getCurrentCUDAStream()));
  }
  return {q, scale};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_quant_fp8(const Tensor& x, const Tensor& residual,
                                                          const Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  check_like(residual, x, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must be ", x.sizes(), " like x, got ", residual.sizes());
  check_weight(weight, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [q, scale] = quant_outputs(x, x.size(1));
  Tensor total = at::empty(x.sizes(), x.options());
  if (x.size(0) > 0) {
    C10_CUDA_CHECK(rmserve::rms_norm_quant_fp8(dtype_of(x, "x"), x.data_ptr(), x.stride(0), residual.data_ptr(),
                                               residual.stride(0), weight.data_ptr(), total.data_ptr(), total.stride(0),
                                               bytes(q), q.stride(0), scale.data_ptr<float>(), x.size(0), x.size(1),
                                               static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()));
  }
  return {q, scale, total};
}

std::tuple<Tensor, Tensor> silu_mul_quant_fp8(const Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must be [tokens, 2 * intermediate], got ", gate_up.sizes());
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t inter = gate_up.size(1) / 2;
  auto [q, scale] = quant_outputs(gate_up, inter);
  if (gate_up.size(0) > 0) {
    C10_CUDA_CHECK(rmserve::silu_mul_quant_fp8(dtype_of(gate_up, "gate_up"), gate_up.data_ptr(), gate_up.stride(0),
                                               bytes(q), q.stride(0), scale.data_ptr<float>(), gate_up.size(0), inter,
                                               c10::cuda::getCurrentCUDAStream()));
  }
  return {q, scale};
}

}  // namespace

// Schemas: every op returns (q float8_e4m3fn [T, C], scale float32 [T, 1]) as torch._scaled_mm's
// row-wise scale_a wants them; add_rms_norm_quant_fp8 also returns residual + x.
TORCH_LIBRARY(rmserve, m) {
  m.def("per_token_quant_fp8(Tensor x) -> (Tensor, Tensor)");
  m.def("rms_norm_quant_fp8(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_quant_fp8(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("silu_mul_quant_fp8(Tensor gate_up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rmserve, CUDA, m) {
  m.impl("per_token_quant_fp8", &per_token_quant_fp8);
  m.impl("rms_norm_quant_fp8", &rms_norm_quant_fp8);
  m.impl("add_rms_norm_quant_fp8", &add_rms_norm_quant_fp8);
  m.impl("silu_mul_quant_fp8", &silu_mul_quant_fp8);
}

// CPU tensors reach the same functions, whose first check rejects them ("x must be a CUDA tensor");
// with no CPU kernel the dispatcher would answer instead ("Could not run ... from the 'CPU' backend").
TORCH_LIBRARY_IMPL(rmserve, CPU, m) {
  m.impl("per_token_quant_fp8", &per_token_quant_fp8);
  m.impl("rms_norm_quant_fp8", &rms_norm_quant_fp8);
  m.impl("add_rms_norm_quant_fp8", &add_rms_norm_quant_fp8);
  m.impl("silu_mul_quant_fp8", &silu_mul_quant_fp8);
}

// `import rmserve._C` loads this library, which runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rmserve's CUDA ops (torch.ops.rmserve)", -1, nullptr};
  return PyModule_Create(&module);
}
