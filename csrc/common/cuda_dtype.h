// Input dtypes of the CUDA kernels and the one switch from a dtype to its element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fusedloss {
namespace cuda {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// f(T{}) with T the element type of dtype.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedloss
