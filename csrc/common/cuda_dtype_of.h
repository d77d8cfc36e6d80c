// The one switch from a torch dtype to the CUDA kernels' DType (cuda_dtype.h), for the families'
// CUDA dispatch in <family>.cpp (compiled with -DWITH_CUDA only).
#pragma once

#include <ATen/ATen.h>

#include "cuda_dtype.h"

namespace fusedloss {

inline cuda::DType cuda_dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "fusedloss: unsupported dtype ", type);
  }
}

}  // namespace fusedloss
