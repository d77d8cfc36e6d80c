// The arrival counter of the CUDA kernels whose last block reduces every block's partial results.
#pragma once

#ifdef WITH_CUDA
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

namespace fusedloss {

// An int32 [1] counter that is 0 when a kernel starts; the kernel's last block resets it to 0.
// One per (device, stream) is kept and reused, which saves a memset per call (the next kernel on
// the stream starts after the reset). While the stream is being captured into a CUDA graph, a
// fresh zeroed counter is made instead: graph replays run on streams of their own.
inline at::Tensor arrival_counter(const at::Tensor& like, cudaStream_t stream) {
  const auto options = like.options().dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone)
    return at::zeros({1}, options);
  static std::mutex mutex;
  // Never destroyed: freeing device memory at process exit, after the driver, would fail.
  static auto* counters = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = (*counters)[{like.get_device(), stream}];
  if (!counter.defined()) counter = at::zeros({1}, options);
  return counter;
}

}  // namespace fusedloss
#endif  // WITH_CUDA
