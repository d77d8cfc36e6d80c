// Host interface of the PVA CUDA kernels (pva_cuda.cu): raw pointers, strides and a stream.
// No torch headers, so nvcc compiles pva_cuda.cu on its own in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pva_math.h"
#include "../common/cuda_dtype.h"

namespace fusedloss {
namespace pva {

using cuda::DType;

// Inputs of both passes. Arithmetic is float64 for kFloat64 inputs, float32 otherwise; the
// terms, their total and grad_terms use that type too. Gradients use the input dtype.
struct CudaInputs {
  const void* pred;            // [B, L, D], any strides
  const void* target;          // [B, L, D], any strides
  const void* cond;            // [B, D], any strides; null without last-frame terms
  int64_t pred_strides[3];
  int64_t target_strides[3];
  int64_t cond_strides[2];
  const double* table;         // [num_parts, 4]: start, end, weight, reg_weight (pva_math.h)
  int64_t num_parts;
  const double* dim_ws;        // [D] or null
  int64_t B, L, D;
  Options opts;
  DType dtype;
};

struct CudaGradients {
  const void* grad_terms;      // [num_parts * K] of the arithmetic type; null = 0
  int64_t grad_terms_stride;   // 0 when it is a broadcast scalar
  const void* grad_total;      // [] of the arithmetic type, or null = 0; d(loss)/d(term) = grad_terms + grad_total
  void* grad_pred;             // [B, L, D] contiguous, or null when not wanted
  void* grad_target;           // [B, L, D] contiguous, or null
  void* grad_cond;             // [B, D] contiguous, or null
};

// Bytes of scratch memory forward_cuda needs (one partial term row per block).
size_t forward_workspace_bytes(const CudaInputs& in);

// One kernel launch: terms [num_parts * K] and total [] of the arithmetic type. counter: an int32
// that is 0 on entry and that the kernel leaves at 0.
cudaError_t forward_cuda(const CudaInputs& in, void* terms, void* total, void* workspace, void* counter,
                         cudaStream_t stream);

// One kernel launch writing the gradients that are not null.
cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream);

}  // namespace pva
}  // namespace fusedloss
