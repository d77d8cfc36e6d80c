// Host interface of the score loss CUDA kernels (score_cuda.cu): raw pointers, strides and a
// stream; no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "score_math.h"
#include "../common/cuda_dtype.h"

namespace fusedloss {
namespace score {

using cuda::DType;

struct CudaInputs {
  const void* scores;          // [B], any stride
  int64_t scores_stride;
  const void* labels;          // [B], any stride
  int64_t labels_stride;
  DType labels_dtype;          // scores' dtype, the arithmetic type, or kFloat64
  const void* logits;          // [B, 2], any strides; null without classification
  int64_t logits_strides[2];
  const double* settings;      // [kNumSettings]: weights, margin
  Problem problem;
  DType dtype;                 // of scores and logits
};

struct CudaOutputs {
  void* terms;                 // [kNumTerms], arithmetic type
  void* total;                 // []
  int32_t* counts;             // [B] signed active-pair counts (ranking only)
  double* rank_scale;          // []
  int32_t* status;             // [] Status bits
};

struct CudaGradients {
  const void* grad_terms;      // [kNumTerms], arithmetic type, any stride; null = 0
  int64_t grad_terms_stride;
  const void* grad_total;      // [], or null = 0
  const int32_t* counts;       // the forward's counts, or null without ranking
  const double* rank_scale;    // the forward's rank_scale
  void* grad_scores;           // [B] contiguous, or null
  void* grad_logits;           // [B, 2] contiguous, or null
};

size_t forward_workspace_bytes(const CudaInputs& in);

// Up to kCudaAllPairsMax (score_math.h) scores, one launch counts every pair directly. Beyond, the scores of each
// class are sorted (a keys kernel and two CUB radix sorts) and one launch counts by binary search.
// counter: an int32 that is 0 on entry and that the kernel leaves at 0.
cudaError_t forward_cuda(const CudaInputs& in, const CudaOutputs& out, void* workspace, void* counter,
                         cudaStream_t stream);

// One kernel launch writing the gradients that are not null.
cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream);

}  // namespace score
}  // namespace fusedloss
