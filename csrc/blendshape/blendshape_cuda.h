// Host interface of the blendshape CUDA kernels (blendshape_cuda.cu): raw pointers, strides and a
// stream; no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "blendshape_math.h"
#include "../common/cuda_dtype.h"

namespace fusedloss {
namespace blendshape {

using cuda::DType;

// Inputs of both passes, viewed as [B, T, K] (T = 1 and stride_t = 0 for [B, K] inputs).
struct CudaInputs {
  const void* pred;
  const void* target;
  const void* raw_pred;        // null unless smoothing is computed
  const void* prev_pred;       // null unless consistency is computed
  int64_t strides[4][3];       // (b, t, k) strides of pred, target, raw_pred, prev_pred
  const double* settings;      // [kNumSettings]: weights, threshold
  const double* group_coef;    // [group_len] or null (default perceptual form)
  int64_t group_len;
  const double* gram;          // [K, K] = M^T M, or null without landmark
  Problem problem;
  DType dtype;
};

struct CudaGradients {
  const void* grad_terms;      // [number of computed terms], arithmetic type, any stride; null = 0
  int64_t grad_terms_stride;
  const void* grad_total;      // [], or null = 0
  const void* col_stats;       // [2, T*K]: importance weights and column sums of e^2 (default form)
  void* grad_pred;             // contiguous like pred, or null
  void* grad_target;
  void* grad_raw;
};

size_t forward_workspace_bytes(const CudaInputs& in);

// One kernel launch: terms, total [], col_stats [2, T*K] (default perceptual form only). counter:
// an int32 that is 0 on entry and that the kernel leaves at 0.
cudaError_t forward_cuda(const CudaInputs& in, void* terms, void* total, void* col_stats, void* workspace,
                         void* counter, cudaStream_t stream);

// One kernel launch writing the gradients that are not null.
cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream);

}  // namespace blendshape
}  // namespace fusedloss
