// Device helpers shared by the CUDA kernels: kernel launches and shared arrays, arithmetic types,
// loads and stores of every input dtype, 128-bit vector accesses, warp and block sums, the SM
// count. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <utility>

// FL_SHARED(T, name, [N]...) declares the block's shared array `__shared__ T name[N]...` (or a
// shared scalar without dimensions). With FUSEDLOSS_SIMT (tests/simt: the kernels run on CPU
// threads) each block gets its own copy on the heap instead, poisoned with 0xFF bytes.
#ifdef FUSEDLOSS_SIMT
#define FL_SHARED(type, name, ...) SIMT_SHARED(type, name, __VA_ARGS__)
#else
#define FL_SHARED(type, name, ...) __shared__ type name __VA_ARGS__
#endif

namespace fusedloss {
namespace cuda {

// kernel<<<grid, block, 0, stream>>>(args...), then the launch's error: the one launch site of
// every kernel (no dynamic shared memory), which the SIMT lane runs on CPU threads instead.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#ifdef FUSEDLOSS_SIMT
  return ::simt::launch(kernel, grid, block, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// Arithmetic type: double for double inputs, float otherwise.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round an arithmetic value to the input dtype (nearest even).
template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- vector accesses: N consecutive elements in 16-byte (128-bit) pieces ----------------------------
// Elements of T in one 16-byte access.
template <typename T> inline constexpr int kVecWidth = 16 / sizeof(T);

// Whether p may be accessed in 16-byte pieces (null, never accessed, counts as aligned).
__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The unsigned word of each access: CUDA's vector types, aligned to their size.
template <int Bytes> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };
template <typename T, int N> constexpr int kPiece = N * sizeof(T) < 16 ? int(N * sizeof(T)) : 16;

// out = p[0, N), read in accesses of min(16, N sizeof(T)) bytes; p must be aligned to that size.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  using W = typename Word<kPiece<T, N>>::type;
  constexpr int kWords = N * sizeof(T) / sizeof(W);
  static_assert(kWords * sizeof(W) == N * sizeof(T), "N elements fill whole words");
  W w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const W*>(p)[i];
  memcpy(out, w, sizeof(w));
}

// *p = w, one store instruction (p: global memory). On the GPU the 8- and 16-byte words are stored by
// PTX: the compiler splits a plain store of such a word, assembled from values of a run that is
// stored element by element on another branch, back into one store per element (seen on sm_90).
template <typename W>
__device__ __forceinline__ void store_word(W* p, const W& w) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(W) == 16) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
                 : "memory");
    return;
  } else if constexpr (sizeof(W) == 8) {
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
    return;
  }
#endif
  *p = w;
}

// p[0, N) = v, written in accesses of min(16, N sizeof(T)) bytes; p must be aligned to that size.
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[N]) {
  using W = typename Word<kPiece<T, N>>::type;
  constexpr int kWords = N * sizeof(T) / sizeof(W);
  static_assert(kWords * sizeof(W) == N * sizeof(T), "N elements fill whole words");
  W w[kWords];
  memcpy(w, v, sizeof(w));
#pragma unroll
  for (int i = 0; i < kWords; ++i) store_word(reinterpret_cast<W*>(p) + i, w[i]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (every thread must call it); the result is valid in thread 0. scratch holds
// one value per warp and is reused: callers synchronise before the next use.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Number of SMs of the current device, looked up once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 132;
  if (device < kMaxDevices && cached[device] > 0) return cached[device];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  if (device < kMaxDevices) cached[device] = sms;
  return sms;
}

}  // namespace cuda
}  // namespace fusedloss
