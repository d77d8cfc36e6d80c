// PVA loss CUDA kernels. The math (terms, spans, normalisers) is pva_math.h's.
//
// Thread layout of both kernels: a block is kCols consecutive columns (one warp, coalesced
// along D) by kLanes warps; a thread walks down time for one column of one work item, a
// (batch element, chunk of kChunk time rows) pair, keeping a sliding window of e = pred - target
// in registers, so every input element is read from memory once (plus a 2-row halo per chunk).
//
// forward:  each thread accumulates the 5 column statistics of its items; the block reduces them
//           per column and then, one warp per term, to a partial value of every term, which it
//           writes to workspace. The last block to finish (atomic ticket) sums the partials of all
//           blocks in a fixed order, so the result is deterministic: terms, total. One launch.
// backward: each block builds the gradient coefficient of its columns (pva_math.h) in shared
//           memory, then each thread writes d/dpred, d/dtarget (and d/dcond at t = 0) of its item.
#include <algorithm>

#include "../common/cuda_helpers.cuh"
#include "pva_cuda.h"

namespace fusedloss {
namespace pva {
namespace {

constexpr int kCols = 32;   // columns per block: one warp
constexpr int kLanes = 8;   // warps per block
constexpr int kChunk = 16;  // time rows per work item
constexpr int kThreads = kCols * kLanes;
static_assert(kCols == 32, "a block row is one warp: warp_sum and the shuffles assume it");
static_assert(kLanes >= kNumStats, "the column reduction gives one warp row per statistic");

using cuda::AccOf;
using cuda::to_acc;
using cuda::warp_sum;

// Work item -> (batch element, first time row, end time row).
struct Item {
  int64_t b, t0, t1;
};
__device__ __forceinline__ Item item_of(int64_t i, int64_t L) {
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  Item it;
  it.b = i / chunks;
  it.t0 = (i % chunks) * kChunk;
  it.t1 = min(it.t0 + kChunk, L);
  return it;
}

template <typename scalar_t>
struct Column {
  // pred and target of one column of one batch element, read along time.
  const scalar_t* p;
  const scalar_t* q;
  int64_t pt, qt, L;
  using acc_t = typename AccOf<scalar_t>::type;
  __device__ __forceinline__ acc_t pred(int64_t t) const {
    return (t >= 0 && t < L) ? to_acc(p[t * pt]) : acc_t(0);
  }
  __device__ __forceinline__ acc_t error(int64_t t) const {
    return (t >= 0 && t < L) ? to_acc(p[t * pt]) - to_acc(q[t * qt]) : acc_t(0);
  }
};

template <typename scalar_t>
__device__ __forceinline__ Column<scalar_t> column(const CudaInputs& in, int64_t b, int64_t d) {
  const scalar_t* pred = static_cast<const scalar_t*>(in.pred);
  const scalar_t* target = static_cast<const scalar_t*>(in.target);
  return Column<scalar_t>{pred + b * in.pred_strides[0] + d * in.pred_strides[2],
                          target + b * in.target_strides[0] + d * in.target_strides[2],
                          in.pred_strides[1], in.target_strides[1], in.L};
}

template <typename scalar_t>
__device__ __forceinline__ typename AccOf<scalar_t>::type cond_value(const CudaInputs& in, int64_t b, int64_t d) {
  const scalar_t* cond = static_cast<const scalar_t*>(in.cond);
  return to_acc(cond[b * in.cond_strides[0] + d * in.cond_strides[1]]);
}

// Blocks per SM the forward is compiled for: 5 caps it at 48 registers (62% occupancy), what
// ptxas picks for float anyway; without the cap it also picks 48 for 16-bit inputs but spills
// 12 bytes there. float64 needs 64 registers (4 blocks).
template <typename scalar_t>
constexpr int kForwardMinBlocks = sizeof(scalar_t) == 8 ? 4 : 5;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks<scalar_t>)
pva_forward_kernel(const CudaInputs in, typename AccOf<scalar_t>::type* __restrict__ terms,
                   typename AccOf<scalar_t>::type* __restrict__ total, unsigned int* __restrict__ counter,
                   typename AccOf<scalar_t>::type* __restrict__ partials) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Options o = in.opts;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t d = int64_t(blockIdx.x) * kCols + tx;
  const int64_t items = in.B * ((in.L + kChunk - 1) / kChunk);

  acc_t s[kNumStats] = {0, 0, 0, 0, 0};
  if (d < in.D) {
    for (int64_t i = int64_t(blockIdx.y) * kLanes + ty; i < items; i += int64_t(gridDim.y) * kLanes) {
      const Item it = item_of(i, in.L);
      const Column<scalar_t> col = column<scalar_t>(in, it.b, d);
      if (o.last_frame && it.t0 == 0) s[kL] += err(col.pred(0) - cond_value<scalar_t>(in, it.b, d), o.l1);
      acc_t e0 = col.error(it.t0), e1 = col.error(it.t0 + 1);
      for (int64_t t = it.t0; t < it.t1; ++t) {
        const acc_t e2 = col.error(t + 2);
        s[kP] += err(e0, o.l1);
        if (t + 1 < in.L) s[kV] += err(e1 - e0, o.l1);
        if (t + 2 < in.L) s[kA] += err(e2 - acc_t(2) * e1 + e0, o.l1);
        if (o.reg) s[kR] += fabs(col.pred(t));
        e0 = e1;
        e1 = e2;
      }
    }
  }

  // Column sums of the block: reduce the kLanes warps.
  FL_SHARED(acc_t, lane_sums, [kNumStats][kLanes][kCols]);
  FL_SHARED(acc_t, col_sums, [kNumStats][kCols]);
#pragma unroll
  for (int k = 0; k < kNumStats; ++k) lane_sums[k][ty][tx] = s[k];
  __syncthreads();
  if (ty < kNumStats) {
    acc_t v = 0;
#pragma unroll
    for (int l = 0; l < kLanes; ++l) v += lane_sums[ty][l][tx];
    col_sums[ty][tx] = v;
  }
  __syncthreads();

  // Partial value of every term over this block's columns, one warp per term.
  const int K = terms_per_part(o);
  const int64_t T = in.num_parts * K;
  const int64_t block = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t nblocks = int64_t(gridDim.x) * gridDim.y;
  const acc_t colw = (in.dim_ws != nullptr && d < in.D) ? acc_t(in.dim_ws[d]) : acc_t(1);
  for (int64_t j = ty; j < T; j += kLanes) {
    const int64_t p = j / K;
    const int stat = term_stat(int(j % K), o);
    int64_t s0, e0;
    part_span(in.table + p * kTableCols, in.D, &s0, &e0);
    const bool inside = d >= s0 && d < e0 && d < in.D;
    acc_t v = inside ? (stat == kR ? acc_t(1) : colw) * col_sums[stat][tx] : acc_t(0);
    v = warp_sum(v);
    if (tx == 0) partials[block * T + j] = v;
  }

  // The last block to arrive reduces the partials of all blocks, in block order.
  FL_SHARED(bool, is_last);
  __threadfence();
  __syncthreads();
  if (tx == 0 && ty == 0) is_last = atomicAdd(counter, 1u) == static_cast<unsigned int>(nblocks - 1);
  __syncthreads();
  if (!is_last) return;
  if (tx == 0 && ty == 0) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch
  __threadfence();
  for (int64_t j = ty; j < T; j += kLanes) {
    acc_t v = 0;
    for (int64_t blk = tx; blk < nblocks; blk += kCols) v += __ldcg(partials + blk * T + j);
    v = warp_sum(v);
    if (tx == 0) {
      const int64_t p = j / K;
      const int stat = term_stat(int(j % K), o);
      const double* row = in.table + p * kTableCols;
      int64_t s0, e0;
      part_span(row, in.D, &s0, &e0);
      terms[j] = v * term_factor<acc_t>(row, stat, in.B, in.L, e0 - s0);
    }
  }
  __syncthreads();
  if (tx == 0 && ty == 0) {
    acc_t sum = 0;
    for (int64_t j = 0; j < T; ++j) sum += terms[j];
    *total = sum;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
pva_backward_kernel(const CudaInputs in, const CudaGradients out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Options o = in.opts;
  const bool l1 = o.l1;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t d = int64_t(blockIdx.x) * kCols + tx;

  // coef[stat][column]: d(loss)/d(statistic of one element), summed over the parts holding it.
  FL_SHARED(acc_t, coef, [kNumStats][kCols]);
  if (ty == 0) {
    acc_t c[kNumStats] = {0, 0, 0, 0, 0};
    if (d < in.D) {
      const acc_t colw = in.dim_ws != nullptr ? acc_t(in.dim_ws[d]) : acc_t(1);
      // total = sum of the terms; a null gradient reads as 0.
      const acc_t* g = static_cast<const acc_t*>(out.grad_terms);
      const acc_t g_total = out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(0);
      const int K = terms_per_part(o);
      for (int64_t p = 0; p < in.num_parts; ++p) {
        const double* row = in.table + p * kTableCols;
        int64_t s0, e0;
        part_span(row, in.D, &s0, &e0);
        if (d < s0 || d >= e0) continue;
        for (int k = 0; k < K; ++k) {
          const int stat = term_stat(k, o);
          const acc_t g_term = g != nullptr ? g[(p * K + k) * out.grad_terms_stride] : acc_t(0);
          const acc_t f = (g_term + g_total) * term_factor<acc_t>(row, stat, in.B, in.L, e0 - s0);
          // c[stat] += ..., with constant indices only: c stays in registers (no local memory)
#pragma unroll
          for (int x = 0; x < kNumStats; ++x)
            if (x == stat) c[x] += x == kR ? f : f * colw;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) coef[k][tx] = c[k];
  }
  __syncthreads();
  if (d >= in.D) return;
  const acc_t cP = coef[kP][tx], cV = coef[kV][tx], cA = coef[kA][tx], cL = coef[kL][tx], cR = coef[kR][tx];
  scalar_t* grad_pred = static_cast<scalar_t*>(out.grad_pred);
  scalar_t* grad_target = static_cast<scalar_t*>(out.grad_target);
  scalar_t* grad_cond = static_cast<scalar_t*>(out.grad_cond);
  const int64_t L = in.L;
  const int64_t items = in.B * ((L + kChunk - 1) / kChunk);

  for (int64_t i = int64_t(blockIdx.y) * kLanes + ty; i < items; i += int64_t(gridDim.y) * kLanes) {
    const Item it = item_of(i, L);
    const Column<scalar_t> col = column<scalar_t>(in, it.b, d);
    // Window at t = t0: e[t-2..t+1], gv[t-1] and ga[t-2], ga[t-1] (0 outside their ranges).
    const int64_t t0 = it.t0;
    const acc_t e_m2 = col.error(t0 - 2);
    acc_t e_m1 = col.error(t0 - 1), e_0 = col.error(t0), e_p1 = col.error(t0 + 1);
    acc_t gv_m1 = (t0 >= 1) ? err_grad(e_0 - e_m1, l1) : acc_t(0);
    acc_t ga_m2 = (t0 >= 2) ? err_grad(e_0 - acc_t(2) * e_m1 + e_m2, l1) : acc_t(0);
    acc_t ga_m1 = (t0 >= 1 && t0 + 1 < L) ? err_grad(e_p1 - acc_t(2) * e_0 + e_m1, l1) : acc_t(0);
    acc_t g_last = 0;
    if (o.last_frame && t0 == 0) {
      g_last = cL * err_grad(col.pred(0) - cond_value<scalar_t>(in, it.b, d), l1);
      if (grad_cond) grad_cond[it.b * in.D + d] = cuda::from_acc<scalar_t>(-g_last);
    }
    for (int64_t t = t0; t < it.t1; ++t) {
      const acc_t e_p2 = col.error(t + 2);
      const acc_t gv_0 = (t + 1 < L) ? err_grad(e_p1 - e_0, l1) : acc_t(0);
      const acc_t ga_0 = (t + 2 < L) ? err_grad(e_p2 - acc_t(2) * e_p1 + e_0, l1) : acc_t(0);
      const acc_t ge = cP * err_grad(e_0, l1) + cV * (gv_m1 - gv_0) + cA * (ga_m2 - acc_t(2) * ga_m1 + ga_0);
      const int64_t idx = (it.b * L + t) * in.D + d;
      if (grad_target) grad_target[idx] = cuda::from_acc<scalar_t>(-ge);
      if (grad_pred) {
        acc_t g = ge;
        if (o.reg) g += cR * sign(col.pred(t));
        if (t == 0) g += g_last;
        grad_pred[idx] = cuda::from_acc<scalar_t>(g);
      }
      e_m1 = e_0;
      e_0 = e_p1;
      e_p1 = e_p2;
      gv_m1 = gv_0;
      ga_m2 = ga_m1;
      ga_m1 = ga_0;
    }
  }
}

using cuda::sm_count;

// Column blocks by item blocks: about 4 blocks per SM for the reduction, every item covered.
dim3 grid_for(const CudaInputs& in, int64_t max_blocks) {
  const int64_t col_blocks = (in.D + kCols - 1) / kCols;
  const int64_t items = in.B * ((in.L + kChunk - 1) / kChunk);
  int64_t item_blocks = (items + kLanes - 1) / kLanes;
  item_blocks = std::max<int64_t>(1, std::min<int64_t>({item_blocks, max_blocks / col_blocks, 65535}));
  return dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(item_blocks));
}

dim3 forward_grid(const CudaInputs& in) { return grid_for(in, 4 * int64_t(sm_count())); }

size_t acc_size(DType t) { return t == DType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace

size_t forward_workspace_bytes(const CudaInputs& in) {
  const dim3 grid = forward_grid(in);
  const size_t T = size_t(in.num_parts) * terms_per_part(in.opts);
  return size_t(grid.x) * grid.y * T * acc_size(in.dtype);
}

template <typename scalar_t>
cudaError_t launch_forward(const CudaInputs& in, void* terms, void* total, void* workspace, void* counter,
                           cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  return cuda::launch(pva_forward_kernel<scalar_t>, forward_grid(in), dim3(kCols, kLanes), stream, in,
                      static_cast<acc_t*>(terms), static_cast<acc_t*>(total), static_cast<unsigned int*>(counter),
                      static_cast<acc_t*>(workspace));
}

template <typename scalar_t>
cudaError_t launch_backward(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream) {
  // A persistent grid (8 blocks per SM): each block builds its columns' coefficients once, then
  // walks many items.
  return cuda::launch(pva_backward_kernel<scalar_t>, grid_for(in, 8 * int64_t(sm_count())), dim3(kCols, kLanes),
                      stream, in, out);
}

cudaError_t forward_cuda(const CudaInputs& in, void* terms, void* total, void* workspace, void* counter,
                         cudaStream_t stream) {
  return cuda::dispatch(in.dtype, [&](auto element) {
    return launch_forward<decltype(element)>(in, terms, total, workspace, counter, stream);
  });
}

cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream) {
  return cuda::dispatch(in.dtype, [&](auto element) { return launch_backward<decltype(element)>(in, out, stream); });
}

}  // namespace pva
}  // namespace fusedloss
