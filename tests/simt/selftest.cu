// The emulator's own test: one small kernel with the patterns of the project's kernels (a
// grid-stride loop, a warp shuffle reduction, shared memory, barriers, a last-block reduction
// with a self-resetting arrival counter), correct or with one planted bug.
// Usage: selftest SCENARIO. "ok" exits 0; each bug must be reported: by simt (an abort naming the
// line), by ASan/UBSan (in an asan build), by TSan (in a tsan build), or by a wrong result (exit 3).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cuda_helpers.cuh"

using fusedloss::cuda::warp_sum;

enum Bug : int {
  kNone,
  kDivergentBarrier,      // a barrier only some threads reach
  kBarrierAfterExit,      // threads return early, the others meet at a barrier
  kDivergentShuffle,      // a full-mask shuffle inside a branch half the warp takes
  kShuffleOutsideMask,    // a shuffle that reads a lane outside its mask
  kSharedOverflow,        // a shared-memory index past the array's end
  kUninitialisedShared,   // a shared value read but never written
  kGlobalOverflow,        // a read one past the input's end
  kMissingBarrier,        // shared memory written and read with no barrier between
  kMissingWriteFence,     // partial sums published without __threadfence
  kMissingReadFence,      // the last block reads the partial sums without __threadfence
  kNoCounterReset,        // the last block does not reset the arrival counter
  kSharedTooLarge,        // 56 KiB of static shared memory
};

__global__ void sum_kernel(const float* x, int n, float* partials, unsigned int* counter, float* out, int bug) {
  FL_SHARED(float, scratch, [32]);
  FL_SHARED(bool, is_last);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = (blockDim.x + 31) / 32;
  if (bug == kSharedTooLarge) {
    FL_SHARED(double, big, [7 * 1024]);
    big[tid] = 0;
  }
  if (bug == kBarrierAfterExit && tid >= 64) return;
  float v = 0;
  const int end = bug == kGlobalOverflow ? n + 1 : n;
  for (int i = blockIdx.x * blockDim.x + tid; i < end; i += gridDim.x * blockDim.x) v += x[i];
  if (bug == kDivergentShuffle) {
    if (lane < 16) v = warp_sum(v);
  } else {
    v = warp_sum(v);
  }
  if (bug == kShuffleOutsideMask && lane < 16) v += 0 * __shfl_sync(0x0000ffffu, v, 20);
  if (lane == 0 && !(bug == kUninitialisedShared && warp == 0)) scratch[warp + (bug == kSharedOverflow ? 32 : 0)] = v;
  if (bug == kDivergentBarrier) {
    if (tid < 32) __syncthreads();
  } else if (bug != kMissingBarrier) {
    __syncthreads();
  }
  if (tid == 0) {
    float t = 0;
    for (int w = 0; w < warps; ++w) t += scratch[w];
    partials[blockIdx.x] = t;
  }
  if (bug != kMissingWriteFence) __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  if (tid == 0 && bug != kNoCounterReset) atomicExch(counter, 0u);
  if (bug != kMissingReadFence) __threadfence();
  if (warp == 0) {
    float t = 0;
    for (int b = lane; b < int(gridDim.x); b += 32) t += __ldcg(partials + b);
    t = warp_sum(t);
    if (lane == 0) *out = t;
  }
}

int main(int argc, char** argv) {
  const char* names[] = {"ok", "divergent_barrier", "barrier_after_exit", "divergent_shuffle",
                         "shuffle_outside_mask", "shared_overflow", "uninitialised_shared", "global_overflow",
                         "missing_barrier", "missing_write_fence", "missing_read_fence", "no_counter_reset",
                         "shared_too_large"};
  const std::string scenario = argc > 1 ? argv[1] : "";
  int bug = -1;
  for (int i = 0; i < int(sizeof(names) / sizeof(*names)); ++i)
    if (scenario == names[i]) bug = i;
  if (scenario == "invalid_launch") {  // more than 1024 threads per block
    const cudaError_t e = fusedloss::cuda::launch(sum_kernel, dim3(1), dim3(2048), nullptr, nullptr, 0, nullptr,
                                                  nullptr, nullptr, 0);
    std::printf("%s\n", cudaGetErrorString(e));
    return e == cudaErrorInvalidConfiguration ? 0 : 1;
  }
  if (bug < 0) {
    std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
    return 2;
  }
  const int n = 10007, blocks = 7, threads = 192;  // 6 warps; 7 blocks walk 10007 values (grid-stride)
  std::vector<float> x(n), partials(blocks);
  double want = 0;
  for (int i = 0; i < n; ++i) want += (x[i] = float(i % 13) - 6.0f);
  unsigned int counter = 0;
  for (int run = 0; run < 2; ++run) {  // the second launch needs the counter back at 0
    float out = -1;
    simt::set_seed(run + 1);
    const cudaError_t e = fusedloss::cuda::launch(sum_kernel, dim3(blocks), dim3(threads), nullptr, x.data(), n,
                                                  partials.data(), &counter, &out, bug);
    std::printf("launch %d: %s, sum %g (want %g), counter %u\n", run, cudaGetErrorString(e), out, want, counter);
    if (e != cudaSuccess || out != float(want) || counter != 0) return 3;
  }
  return 0;
}
