// Blendshape loss CUDA kernels. The math (sums, counts, gradients) is blendshape_math.h's.
//
// Layout: inputs viewed as [B, T, K]. A block owns a tile of SB batch rows x ST time rows x all K
// columns (at most kTile elements, kPerThread per thread, element i of the tile fixed to a thread),
// and walks down the batch in steps of SB rows for its block of ST time rows. A thread therefore
// keeps the column sums (over b) of its elements in registers, and a whole row's e is in the block
// for the landmark term e^T G e (through shared memory).
//
// forward:  each block writes its partial sums and column sums; the last block to finish (atomic
//           ticket) reduces them in block order (deterministic): terms, weighted total, and the
//           column statistics (importance weights w = target.mean(0), sum_b e^2). One launch.
// backward: each block computes the gradient coefficients, then writes d/dpred, d/dtarget (with
//           the path through w) and d/draw_pred of its elements. One launch.
//
// The forward reads a step of a block whose inputs are contiguous and 16-byte aligned (and whose
// step starts at a multiple of the run length V) in runs of V consecutive elements per thread, one
// vector load per input and run (128-bit for fp32/fp64, 64-bit for 16-bit inputs); other steps
// element by element. The backward does the same with the same runs, and also needs the gradients
// (and the column statistics) 16-byte aligned: a run's gradients are one vector store each.
#include <algorithm>
#include <type_traits>

#include "blendshape_cuda.h"
#include "../common/cuda_helpers.cuh"

namespace fusedloss {
namespace blendshape {
namespace {

using cuda::AccOf;
using cuda::block_sum;
using cuda::from_acc;
using cuda::to_acc;
using cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int kTile = kThreads * kPerThread;  // elements of a tile: SB x ST x K
// Blocks per SM the forward is compiled for (at most 64 registers per thread, 128 for double).
template <typename scalar_t> constexpr int kMinBlocks = sizeof(scalar_t) == 8 ? 2 : 4;

struct Tile {
  int ST, SB;  // time rows and batch rows of a tile
};

// This block's time rows: the first, and the tile's columns (t, k) and elements per batch step.
struct BlockTile {
  int64_t t0;
  int tile_cols, n;
};
__device__ __forceinline__ BlockTile block_tile(const Problem& pb, const Tile& tile) {
  BlockTile bt;
  bt.t0 = int64_t(blockIdx.x) * tile.ST;
  bt.tile_cols = static_cast<int>((tile.ST < pb.T - bt.t0 ? tile.ST : pb.T - bt.t0) * pb.K);
  bt.n = tile.SB * bt.tile_cols;
  return bt;
}

// Element i of a step: batch row, time row and column of the tile; false past the tile or batch.
struct Element {
  int64_t b, t;
  int k;
  int c;  // column (t - t0, k) of the tile: c = (t - t0) * K + k
  bool ok;
};
// (32-bit divisions: idx < kTile and K <= kTile.)
__device__ __forceinline__ Element element(int idx, int n, int tile_cols, int64_t K, int64_t b0, int64_t t0, int64_t B) {
  Element el{};
  if (idx >= n) return el;
  const int sb = idx / tile_cols, k_cols = static_cast<int>(K);
  el.c = idx - sb * tile_cols;
  const int tt = el.c / k_cols;
  el.k = el.c - tt * k_cols;
  el.t = t0 + tt;
  el.b = b0 + sb;
  el.ok = el.b < B;
  return el;
}

template <typename scalar_t>
__device__ __forceinline__ typename AccOf<scalar_t>::type load(const scalar_t* x, const int64_t* s, int64_t b, int64_t t,
                                                               int64_t k) {
  return to_acc(x[b * s[0] + t * s[1] + k * s[2]]);
}
template <typename scalar_t>
__device__ __forceinline__ typename AccOf<scalar_t>::type load(const void* x, const int64_t* s, int64_t b, int64_t t,
                                                               int64_t k) {
  return load(static_cast<const scalar_t*>(x), s, b, t, k);
}

// One batch step of a block: the tile's SB x ST x K elements from batch row b0 on.
struct Step {
  int n, tile_cols;
  int64_t K, T, B, C, b0, t0;
  __device__ __forceinline__ Element at(int idx) const { return element(idx, n, tile_cols, K, b0, t0, B); }
  // el = the next element of a vector run (contiguous [B, T, K] memory: after the row's last
  // column the next time row, after the last time row the next batch row's first; el.b is left
  // as it was: a run reads only el.k and el.t).
  __device__ __forceinline__ void advance(Element& el) const {
    if (++el.k == K) {
      el.k = 0;
      if (++el.t == T) el.t = 0;
    }
  }
};

// Runs (forward): a thread owns kPerThread / V runs of V consecutive tile elements, the same in
// every step: element i of the thread is tile element idx(i) = V tid + i % V + (i / V) V kThreads.
template <int V>
__device__ __forceinline__ int run_start(int tid, int r) {
  return V * tid + r * V * kThreads;
}
// Tile element of the thread's element i.
template <int V>
__device__ __forceinline__ int thread_element(int tid, int i) {
  return run_start<V>(tid, i / V) + i % V;
}

// Offset of element idx0 in a contiguous [B, T, K] tensor.
__device__ __forceinline__ int64_t run_offset(const Step& st, int idx0) {
  const int sb = idx0 / st.tile_cols;
  return (st.b0 + sb) * st.C + st.t0 * st.K + (idx0 - sb * st.tile_cols);
}

// Whether the block's steps may read their runs as vector pieces: every input read is contiguous
// [B, T, K] and 16-byte aligned, and a run of V tile elements is V
// consecutive elements in memory starting at a multiple of V (the tile is contiguous, or each of
// its batch rows is whole runs). The step's start b0 C must be a multiple of V too (vec_step).
template <int V>
__device__ __forceinline__ bool vec_block(const CudaInputs& in, const Step& st) {
  const void* ins[4] = {in.pred, in.target, in.raw_pred, in.prev_pred};
  bool ok = (st.tile_cols == st.C || (st.tile_cols % V == 0 && st.C % V == 0)) && (st.t0 * st.K) % V == 0;
  for (int x = 0; x < 4; ++x) {
    if (ins[x] == nullptr) continue;
    const int64_t* s = in.strides[x];
    ok = ok && cuda::aligned16(ins[x]) && s[2] == 1 && (s[1] == st.K || st.T == 1) && s[0] == st.C;
  }
  return ok;
}
template <int V>
__device__ __forceinline__ bool vec_step(bool block_ok, const Step& st) {
  return block_ok && (st.b0 * st.C) % V == 0;
}

// Elements j of the run at tile element idx0 (memory offset off, in a step whose tile is
// contiguous runs) that lie in the tile and the batch: bit j set.
template <int V>
__device__ __forceinline__ unsigned run_mask(const Step& st, int idx0, int64_t off) {
  unsigned ok = 0;
#pragma unroll
  for (int j = 0; j < V; ++j) ok |= unsigned(idx0 + j < st.n && off + j < st.B * st.C) << j;
  return ok;
}

// out[j] = x[off + shift + j] for the elements j of a contiguous run whose bit of mask is set:
// one vector access of V elements when whole (every bit set, aligned to V elements), else element
// by element (others 0).
template <int V, typename scalar_t>
__device__ __forceinline__ void load_masked(const scalar_t* x, int64_t off, int64_t shift, unsigned mask, bool whole,
                                            scalar_t (&out)[V]) {
  if (whole) {
    cuda::load_vec<V>(x + off + shift, out);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    out[j] = mask >> j & 1 ? x[off + shift + j] : from_acc<scalar_t>(typename AccOf<scalar_t>::type(0));
}

// x[off + j] = v[j] for the elements j of a contiguous run whose bit of mask is set: one vector
// access of V elements when whole (every bit set, aligned to V elements), else element by element.
template <int V, typename scalar_t>
__device__ __forceinline__ void store_masked(scalar_t* x, int64_t off, unsigned mask, bool whole,
                                             const scalar_t (&v)[V]) {
  if (whole) {
    cuda::store_vec<V>(x + off, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (mask >> j & 1) x[off + j] = v[j];
}

// out[j] = x[column of element j of the run from el]: one vector when vec (C is whole runs: the
// run's columns are V consecutive ones), else column by column.
template <int V, typename acc_t>
__device__ __forceinline__ void col_stat(const acc_t* x, const Step& st, Element el, bool vec, acc_t (&out)[V]) {
  if (vec) {
    cuda::load_vec<V>(x + el.t * st.K + el.k, out);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    out[j] = x[el.t * st.K + el.k];
    st.advance(el);
  }
}

// (G e)[k] of element idx's row, e of the step in shared memory (row starts at idx - k).
template <typename acc_t>
__device__ __forceinline__ acc_t gram_row(const double* gram, const acc_t* e_s, int idx, int64_t k, int64_t K) {
  const acc_t* row = e_s + (idx - k);
  const double* g = gram + k * K;
  acc_t v = 0;
  for (int64_t j = 0; j < K; ++j) v += static_cast<acc_t>(__ldg(g + j)) * row[j];
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>)
blendshape_forward_kernel(const CudaInputs in, const Tile tile, typename AccOf<scalar_t>::type* __restrict__ terms,
                          typename AccOf<scalar_t>::type* __restrict__ total,
                          typename AccOf<scalar_t>::type* __restrict__ col_stats, unsigned int* __restrict__ counter,
                          typename AccOf<scalar_t>::type* __restrict__ partials,
                          typename AccOf<scalar_t>::type* __restrict__ colpart) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Problem& pb = in.problem;
  const int64_t B = pb.B, T = pb.T, K = pb.K, C = T * K;
  const int tid = threadIdx.x;
  const BlockTile bt = block_tile(pb, tile);
  const int64_t t0 = bt.t0;
  const int tile_cols = bt.tile_cols, n = bt.n;
  const bool cols = has(pb.term_mask, kPerceptual) && !pb.group_form;
  const bool groups = has(pb.term_mask, kPerceptual) && pb.group_form;
  const bool landmark = has(pb.term_mask, kLandmark);
  const acc_t thr = threshold_as<scalar_t, acc_t>(in.settings[kThreshold],
                                                 [](float x) { return to_acc(from_acc<scalar_t>(x)); });
  FL_SHARED(acc_t, e_s, [kTile]);
  FL_SHARED(acc_t, scratch, [kThreads / 32]);
  FL_SHARED(acc_t, final_sums, [kPartialsWidth]);
  FL_SHARED(bool, is_last);

  // Run length: 16 bytes (one 128-bit load), but at most 4 elements: 8 of a 16-bit input (with the
  // column sums) do not fit 64 registers; their runs are 64-bit loads.
  constexpr int V = cuda::kVecWidth<scalar_t> < 4 ? cuda::kVecWidth<scalar_t> : 4;
  static_assert(kPerThread % V == 0, "a thread's elements are whole runs");
  const auto* pred = static_cast<const scalar_t*>(in.pred);
  const auto* target = static_cast<const scalar_t*>(in.target);
  const auto* raw_pred = static_cast<const scalar_t*>(in.raw_pred);
  const auto* prev_pred = static_cast<const scalar_t*>(in.prev_pred);
  Step st{n, tile_cols, K, T, B, C, 0, t0};
  const bool vec_ok = vec_block<V>(in, st);

  acc_t sums[kNumSums] = {};
  acc_t colT[kPerThread] = {}, colS2[kPerThread] = {};
  for (int64_t b0 = int64_t(blockIdx.y) * tile.SB; b0 < B; b0 += int64_t(gridDim.y) * tile.SB) {
    st.b0 = b0;
    const bool step_vec = vec_step<V>(vec_ok, st);
#pragma unroll
    for (int r = 0; r < kPerThread / V; ++r) {  // the run of the thread's elements r V + j
      const int idx0 = run_start<V>(tid, r);
      // Element idx0 + j's terms of p and q (not its temporal, smoothing, consistency ones); its e.
      auto add = [&](int j, const Element& el, acc_t p, acc_t q) {
        const int idx = idx0 + j, i = r * V + j;
        acc_t e = 0;
        if (el.ok) {
          e = p - q;
          sums[kSqErr] += e * e;
          sums[kAbsErr] += fabs(e);
          sums[kActive] += acc_t((p > thr) != (q > thr));
          if (groups && el.k < in.group_len) sums[kGroupSq] += static_cast<acc_t>(in.group_coef[el.k]) * e * e;
          if (cols) {
            colT[i] += q;
            colS2[i] += e * e;
          }
        }
        if (landmark && idx < n) e_s[idx] = e;  // 0 past the batch
        return e;
      };
      if (step_vec) {
        // The run is contiguous memory: whole in 16-byte pieces, else the elements of the tile and
        // batch one by one; one input at a time (V values of each in registers).
        if (idx0 >= n) continue;
        const int64_t off = run_offset(st, idx0);
        const unsigned ok = run_mask<V>(st, idx0, off), all = (1u << V) - 1;
        scalar_t pv[V], xv[V], yv[V];
        acc_t e[V];
        unsigned next = 0;  // bit j: element j has a next time row
        load_masked<V>(pred, off, 0, ok, ok == all, pv);
        load_masked<V>(target, off, 0, ok, ok == all, xv);
        Element el = st.at(idx0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          el.ok = ok >> j & 1;
          e[j] = add(j, el, to_acc(pv[j]), to_acc(xv[j]));
          next |= unsigned(el.ok && el.t + 1 < T) << j;
          st.advance(el);
        }
        if (has(pb.term_mask, kTemporal)) {  // e at (b, t + 1, k): K elements further on
          const bool whole = next == all && K % V == 0;
          load_masked<V>(pred, off, K, next, whole, xv);
          load_masked<V>(target, off, K, next, whole, yv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t d = to_acc(xv[j]) - to_acc(yv[j]) - e[j];
            if (next >> j & 1) sums[kTemporalSq] += d * d;
          }
        }
        if (has(pb.term_mask, kSmoothing)) {
          load_masked<V>(raw_pred, off, 0, ok, ok == all, xv);
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (ok >> j & 1) sums[kSmoothAbs] += fabs(to_acc(pv[j]) - to_acc(xv[j]));
        }
        if (has(pb.term_mask, kConsistency)) {
          load_masked<V>(prev_pred, off, 0, ok, ok == all, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t d = to_acc(pv[j]) - to_acc(xv[j]);
            if (ok >> j & 1) sums[kConsistencySq] += d * d;
          }
        }
      } else {  // element by element
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const Element el = st.at(idx0 + j);
          acc_t p = 0, q = 0;
          if (el.ok) {
            p = load(pred, in.strides[0], el.b, el.t, el.k);
            q = load(target, in.strides[1], el.b, el.t, el.k);
          }
          const acc_t e = add(j, el, p, q);
          if (!el.ok) continue;
          if (has(pb.term_mask, kTemporal) && el.t + 1 < T) {
            const acc_t d = load(pred, in.strides[0], el.b, el.t + 1, el.k) -
                            load(target, in.strides[1], el.b, el.t + 1, el.k) - e;
            sums[kTemporalSq] += d * d;
          }
          if (has(pb.term_mask, kSmoothing)) sums[kSmoothAbs] += fabs(p - load(raw_pred, in.strides[2], el.b, el.t, el.k));
          if (has(pb.term_mask, kConsistency)) {
            const acc_t d = p - load(prev_pred, in.strides[3], el.b, el.t, el.k);
            sums[kConsistencySq] += d * d;
          }
        }
      }
    }
    if (landmark) {
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int idx = thread_element<V>(tid, i);
        const Element el = st.at(idx);
        if (el.ok) sums[kLandmarkSq] += e_s[idx] * gram_row(in.gram, e_s, idx, el.k, K);
      }
      __syncthreads();
    }
  }

  // Column sums of the tile: combine the batch rows of the tile (in order), then finish the columns
  // here when this block is the only one over them, else leave them to the last block.
  const int64_t block = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t nblocks = int64_t(gridDim.x) * gridDim.y;
  const bool single_group = gridDim.y == 1;
  acc_t weighted = 0;
  if (cols) {
    acc_t ct[kPerThread] = {}, cs[kPerThread] = {};
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int idx = thread_element<V>(tid, i);
        if (idx < n) e_s[idx] = pass == 0 ? colT[i] : colS2[i];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int c = tid + j * kThreads;
        if (c >= tile_cols) continue;
        acc_t v = 0;
        for (int sb = 0; sb < tile.SB; ++sb) v += e_s[sb * tile_cols + c];
        if (pass == 0) ct[j] = v;
        else cs[j] = v;
      }
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int c = tid + j * kThreads;
      if (c >= tile_cols) continue;
      const int64_t column = t0 * K + c;
      if (single_group) {
        const acc_t w = B > 0 ? ct[j] / static_cast<acc_t>(B) : acc_t(0);
        col_stats[kColImportance * C + column] = w;
        col_stats[kColSqErr * C + column] = cs[j];
        weighted += w * w * cs[j];
      } else {
        acc_t* part = colpart + int64_t(blockIdx.y) * 2 * C;
        part[kColImportance * C + column] = ct[j];
        part[kColSqErr * C + column] = cs[j];
      }
    }
  }
  __syncthreads();
  for (int s = 0; s < kNumSums; ++s) {
    const acc_t v = block_sum(sums[s], scratch);
    if (tid == 0) partials[block * kPartialsWidth + s] = v;
  }
  {
    const acc_t v = block_sum(weighted, scratch);
    if (tid == 0) partials[block * kPartialsWidth + kWeightedSum] = v;
  }

  // The last block to arrive reduces the partials of all blocks, in block order.
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(counter, 1u) == static_cast<unsigned int>(nblocks - 1);
  __syncthreads();
  if (!is_last) return;
  if (tid == 0) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch
  __threadfence();
  const int warp = tid / 32, lane = tid % 32;
  for (int s = warp; s <= kWeightedSum; s += kThreads / 32) {
    acc_t v = 0;
    for (int64_t blk = lane; blk < nblocks; blk += 32) v += __ldcg(partials + blk * kPartialsWidth + s);
    v = warp_sum(v);
    if (lane == 0) final_sums[s] = v;
  }
  __syncthreads();
  if (cols && !single_group) {
    // Each column summed over the batch groups in a fixed order: a warp per column (lanes over the
    // groups) when there are many groups, else a thread per column.
    const int64_t groups = gridDim.y;
    const acc_t inv_B = B > 0 ? acc_t(1) / static_cast<acc_t>(B) : acc_t(0);
    acc_t local = 0;
    if (groups >= 32) {
      for (int64_t c = warp; c < C; c += kThreads / 32) {
        acc_t ct = 0, cs = 0;
        for (int64_t g = lane; g < groups; g += 32) {
          ct += __ldcg(colpart + g * 2 * C + c);
          cs += __ldcg(colpart + g * 2 * C + C + c);
        }
        ct = warp_sum(ct);
        cs = warp_sum(cs);
        if (lane == 0) {
          const acc_t w = ct * inv_B;
          col_stats[kColImportance * C + c] = w;
          col_stats[kColSqErr * C + c] = cs;
          local += w * w * cs;
        }
      }
    } else {
      for (int64_t c = tid; c < C; c += kThreads) {
        acc_t ct = 0, cs = 0;
        for (int64_t g = 0; g < groups; ++g) {
          ct += __ldcg(colpart + g * 2 * C + c);
          cs += __ldcg(colpart + g * 2 * C + C + c);
        }
        const acc_t w = ct * inv_B;
        col_stats[kColImportance * C + c] = w;
        col_stats[kColSqErr * C + c] = cs;
        local += w * w * cs;
      }
    }
    const acc_t v = block_sum(local, scratch);
    if (tid == 0) final_sums[kWeightedSum] = v;
    __syncthreads();
  }
  if (tid == 0) {
    acc_t sum = 0;
    for (int term = 0; term < kNumTerms; ++term) {
      if (!has(pb.term_mask, term)) continue;
      const acc_t value = term_value<acc_t>(pb, term, final_sums, final_sums[kWeightedSum]);
      terms[term_index(pb.term_mask, term)] = value;
      sum += static_cast<acc_t>(in.settings[term]) * value;
    }
    *total = sum;
  }
}

// Blocks per SM the backward is compiled for: at most 64 registers per thread (50% occupancy); 80
// for double (37.5%: at 64 its vector runs spill; 768 threads with one run's two 16-byte loads each
// in flight are 24 KB per SM, about H200's bandwidth x latency per SM, 4.8 TB/s x ~0.7 us / 132).
template <typename scalar_t> constexpr int kBackwardMinBlocks = sizeof(scalar_t) == 8 ? 3 : 4;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks<scalar_t>)
blendshape_backward_kernel(const CudaInputs in, const CudaGradients out, const Tile tile) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Problem& pb = in.problem;
  const int64_t B = pb.B, T = pb.T, K = pb.K, C = T * K;
  const int tid = threadIdx.x;
  const BlockTile bt = block_tile(pb, tile);
  const bool cols = has(pb.term_mask, kPerceptual) && !pb.group_form;
  const bool groups = has(pb.term_mask, kPerceptual) && pb.group_form;
  const bool landmark = has(pb.term_mask, kLandmark);
  FL_SHARED(acc_t, e_s, [kTile]);

  const acc_t* g = static_cast<const acc_t*>(out.grad_terms);
  const acc_t g_total = out.grad_total != nullptr ? *static_cast<const acc_t*>(out.grad_total) : acc_t(0);
  const int64_t gs = out.grad_terms_stride;
  // The terms' gradient coefficients: a double's through shared memory, read where used (7 doubles
  // held in registers take 14, and the vector runs spill); a float's in registers.
  constexpr bool kShared = sizeof(acc_t) == 8;
  FL_SHARED(acc_t, coef_s, [kNumTerms]);
  if constexpr (kShared) {
    if (tid < kNumTerms) coef_s[tid] = grad_coefficient<acc_t>(pb, tid, g, gs, g_total, in.settings);
    __syncthreads();
  }
  using coef_t = std::conditional_t<kShared, const acc_t&, const acc_t>;
  auto coefficient = [&](int term) -> coef_t {
    if constexpr (kShared) return coef_s[term];
    else return grad_coefficient<acc_t>(pb, term, g, gs, g_total, in.settings);
  };
  coef_t c_mse = coefficient(kMse), c_l1 = coefficient(kL1), c_perc = coefficient(kPerceptual),
         c_temporal = coefficient(kTemporal), c_landmark = coefficient(kLandmark), c_smooth = coefficient(kSmoothing),
         c_cons = coefficient(kConsistency);
  const acc_t* w_col = static_cast<const acc_t*>(out.col_stats);
  scalar_t* grad_pred = static_cast<scalar_t*>(out.grad_pred);
  scalar_t* grad_target = static_cast<scalar_t*>(out.grad_target);
  scalar_t* grad_raw = static_cast<scalar_t*>(out.grad_raw);

  // Runs as the forward's: V elements, one 16-byte access of a 32- or 64-bit input, 8 bytes of a
  // 16-bit one (8 elements of a 16-bit input do not fit 64 registers either).
  constexpr int V = cuda::kVecWidth<scalar_t> < 4 ? cuda::kVecWidth<scalar_t> : 4;
  static_assert(kPerThread % V == 0, "a thread's elements are whole runs");
  const auto* pred = static_cast<const scalar_t*>(in.pred);
  const auto* target = static_cast<const scalar_t*>(in.target);
  const auto* raw_pred = static_cast<const scalar_t*>(in.raw_pred);
  const auto* prev_pred = static_cast<const scalar_t*>(in.prev_pred);
  Step st{bt.n, bt.tile_cols, K, T, B, C, 0, bt.t0};
  // Vector runs need the gradients (contiguous [B, T, K]) 16-byte aligned too; the column
  // statistics of a run are one vector of V columns when C is whole runs (then no run wraps a row).
  const bool vec_ok = vec_block<V>(in, st) && cuda::aligned16(grad_pred) && cuda::aligned16(grad_target) &&
                      cuda::aligned16(grad_raw);
  const bool cols_vec = C % V == 0 && cuda::aligned16(w_col);

  for (int64_t b0 = int64_t(blockIdx.y) * tile.SB; b0 < B; b0 += int64_t(gridDim.y) * tile.SB) {
    st.b0 = b0;
    const bool step_vec = vec_step<V>(vec_ok, st);
    if (step_vec) {
      // Runs of V consecutive elements in memory (see the forward): whole runs as vector accesses,
      // the run past the batch or tile, and the neighbouring time rows of a run that is not whole
      // or not aligned (K % V != 0), element by element.
      if (landmark) {  // this step's e, for the rows' G e
#pragma unroll
        for (int r = 0; r < kPerThread / V; ++r) {
          const int idx0 = run_start<V>(tid, r);
          if (idx0 >= st.n) continue;
          const int64_t off = run_offset(st, idx0);
          const unsigned ok = run_mask<V>(st, idx0, off), all = (1u << V) - 1;
          scalar_t pv[V], qv[V];
          load_masked<V>(pred, off, 0, ok, ok == all, pv);
          load_masked<V>(target, off, 0, ok, ok == all, qv);
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (idx0 + j < st.n) e_s[idx0 + j] = ok >> j & 1 ? to_acc(pv[j]) - to_acc(qv[j]) : acc_t(0);
        }
        __syncthreads();
      }
#pragma unroll
      for (int r = 0; r < kPerThread / V; ++r) {
        const int idx0 = run_start<V>(tid, r);
        if (idx0 >= st.n) continue;
        const int64_t off = run_offset(st, idx0);
        const unsigned ok = run_mask<V>(st, idx0, off), all = (1u << V) - 1;
        scalar_t pv[V], xv[V], yv[V], gv[V];  // (gv: gradients)
        acc_t e[V], ge[V], cq[V];  // e, d/de of the loss, the path through w into d/dtarget
        load_masked<V>(pred, off, 0, ok, ok == all, pv);
        load_masked<V>(target, off, 0, ok, ok == all, xv);
        unsigned before = 0, after = 0;  // bit j: element j has a time row before / after it
        {
          acc_t w[V], wsq[V];  // the importance weights w and sum_b e^2 of the run's columns
          Element el = st.at(idx0);
          if (cols) {
            col_stat<V>(w_col + kColImportance * C, st, el, cols_vec, w);
            if (grad_target) col_stat<V>(w_col + kColSqErr * C, st, el, cols_vec, wsq);
          }
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const bool in_run = ok >> j & 1;
            e[j] = to_acc(pv[j]) - to_acc(xv[j]);
            ge[j] = acc_t(2) * c_mse * e[j] + c_l1 * sign(e[j]);
            if (groups)
              ge[j] += acc_t(2) * c_perc * (el.k < in.group_len ? static_cast<acc_t>(in.group_coef[el.k]) : acc_t(0)) *
                       e[j];
            if (cols) {
              ge[j] += acc_t(2) * c_perc * w[j] * w[j] * e[j];
              if (grad_target) cq[j] = acc_t(2) * c_perc * w[j] * wsq[j] / static_cast<acc_t>(B);  // (B > 0 here)
            }
            before |= unsigned(in_run && el.t >= 1) << j;
            after |= unsigned(in_run && el.t + 1 < T) << j;
            st.advance(el);
          }
        }
        if (has(pb.term_mask, kTemporal)) {  // e at (b, t - 1, k) and (b, t + 1, k): K elements away
          load_masked<V>(pred, off, -K, before, before == all && K % V == 0, xv);
          load_masked<V>(target, off, -K, before, before == all && K % V == 0, yv);
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (before >> j & 1) ge[j] += acc_t(2) * c_temporal * (e[j] - (to_acc(xv[j]) - to_acc(yv[j])));
          load_masked<V>(pred, off, K, after, after == all && K % V == 0, xv);
          load_masked<V>(target, off, K, after, after == all && K % V == 0, yv);
#pragma unroll
          for (int j = 0; j < V; ++j)
            if (after >> j & 1) ge[j] -= acc_t(2) * c_temporal * ((to_acc(xv[j]) - to_acc(yv[j])) - e[j]);
        }
        if (landmark) {
          Element el = st.at(idx0);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (ok >> j & 1) ge[j] += acc_t(2) * c_landmark * gram_row(in.gram, e_s, idx0 + j, el.k, K);
            st.advance(el);
          }
        }
        if (grad_target) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc_t gq = -ge[j];
            if (cols) gq += cq[j];
            gv[j] = from_acc<scalar_t>(gq);
          }
          store_masked<V>(grad_target, off, ok, ok == all, gv);
        }
        if (has(pb.term_mask, kSmoothing)) {
          load_masked<V>(raw_pred, off, 0, ok, ok == all, xv);
          scalar_t grv[V];
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t s = c_smooth * sign(to_acc(pv[j]) - to_acc(xv[j]));
            ge[j] += s;
            grv[j] = from_acc<scalar_t>(-s);
          }
          if (grad_raw) store_masked<V>(grad_raw, off, ok, ok == all, grv);
        }
        if (has(pb.term_mask, kConsistency)) {
          load_masked<V>(prev_pred, off, 0, ok, ok == all, xv);
#pragma unroll
          for (int j = 0; j < V; ++j) ge[j] += acc_t(2) * c_cons * (to_acc(pv[j]) - to_acc(xv[j]));
        }
        if (grad_pred) {
          scalar_t gpv[V];
#pragma unroll
          for (int j = 0; j < V; ++j) gpv[j] = from_acc<scalar_t>(ge[j]);
          store_masked<V>(grad_pred, off, ok, ok == all, gpv);
        }
      }
      if (landmark) __syncthreads();
      continue;
    }
    // Element by element: element i of the thread is tile element tid + i kThreads.
    if (landmark) {  // this step's e, for the rows' G e
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int idx = tid + i * kThreads;
        const Element el = st.at(idx);
        if (idx < st.n)
          e_s[idx] = el.ok ? load(pred, in.strides[0], el.b, el.t, el.k) - load(target, in.strides[1], el.b, el.t, el.k)
                           : acc_t(0);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int idx = tid + i * kThreads;
      const Element el = st.at(idx);
      if (!el.ok) continue;
      const acc_t p = load(pred, in.strides[0], el.b, el.t, el.k);
      const acc_t e = p - load(target, in.strides[1], el.b, el.t, el.k);
      const int64_t column = el.t * K + el.k;
      acc_t ge = acc_t(2) * c_mse * e + c_l1 * sign(e);
      if (groups) ge += acc_t(2) * c_perc * (el.k < in.group_len ? static_cast<acc_t>(in.group_coef[el.k]) : acc_t(0)) * e;
      if (cols) {
        const acc_t w = w_col[kColImportance * C + column];
        ge += acc_t(2) * c_perc * w * w * e;
      }
      if (has(pb.term_mask, kTemporal)) {
        if (el.t >= 1)
          ge += acc_t(2) * c_temporal * (e - (load(pred, in.strides[0], el.b, el.t - 1, el.k) -
                                               load(target, in.strides[1], el.b, el.t - 1, el.k)));
        if (el.t + 1 < T)
          ge -= acc_t(2) * c_temporal * ((load(pred, in.strides[0], el.b, el.t + 1, el.k) -
                                          load(target, in.strides[1], el.b, el.t + 1, el.k)) - e);
      }
      if (landmark) ge += acc_t(2) * c_landmark * gram_row(in.gram, e_s, idx, el.k, K);
      const int64_t at = (el.b * T + el.t) * K + el.k;
      if (grad_target) {
        acc_t gq = -ge;
        if (cols)  // (B > 0 here)
          gq += acc_t(2) * c_perc * w_col[kColImportance * C + column] * w_col[kColSqErr * C + column] / static_cast<acc_t>(B);
        grad_target[at] = from_acc<scalar_t>(gq);
      }
      acc_t gp = ge;
      if (has(pb.term_mask, kSmoothing)) {
        const acc_t s = c_smooth * sign(p - load(raw_pred, in.strides[2], el.b, el.t, el.k));
        gp += s;
        if (grad_raw) grad_raw[at] = from_acc<scalar_t>(-s);
      }
      if (has(pb.term_mask, kConsistency))
        gp += acc_t(2) * c_cons * (p - load(prev_pred, in.strides[3], el.b, el.t, el.k));
      if (grad_pred) grad_pred[at] = from_acc<scalar_t>(gp);
    }
    if (landmark) __syncthreads();
  }
}

size_t acc_size(DType t) { return t == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// As many time rows as fit, but short enough tiles for one per SM when T is long; then batch rows.
Tile tile_for(const Problem& pb) {
  Tile t;
  int64_t st = std::max<int64_t>(1, std::min<int64_t>(pb.T, kTile / pb.K));
  const int64_t sms = cuda::sm_count();
  while (st > 1 && (pb.T + st - 1) / st < sms) st = (st + 1) / 2;
  t.ST = static_cast<int>(st);
  t.SB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(pb.B, 1), kTile / (st * pb.K))));
  return t;
}

// (time blocks, batch groups): about per_sm blocks per SM; few batch groups when the column
// sums of several must be combined by the last block.
dim3 grid_for(const CudaInputs& in, const Tile& tile, int per_sm, bool forward) {
  const Problem& pb = in.problem;
  const int64_t t_blocks = (pb.T + tile.ST - 1) / tile.ST;
  int64_t groups = std::max<int64_t>(1, (pb.B + tile.SB - 1) / tile.SB);
  groups = std::min<int64_t>({groups, std::max<int64_t>(1, per_sm * cuda::sm_count() / t_blocks), 65535});
  if (forward && has(pb.term_mask, kPerceptual) && !pb.group_form && groups > 1)
    groups = std::max<int64_t>(1, std::min<int64_t>(groups, kColumnPartialsMax / (2 * pb.T * pb.K)));
  return dim3(static_cast<unsigned>(t_blocks), static_cast<unsigned>(groups));
}

}  // namespace

size_t forward_workspace_bytes(const CudaInputs& in) {
  const Problem& pb = in.problem;
  const dim3 grid = grid_for(in, tile_for(pb), 4, true);
  const size_t acc = acc_size(in.dtype);
  const bool cols = has(pb.term_mask, kPerceptual) && !pb.group_form;
  const size_t columns = cols && grid.y > 1 ? size_t(grid.y) * 2 * pb.T * pb.K : 0;
  return size_t(grid.x) * grid.y * kPartialsWidth * acc + columns * acc;
}

template <typename scalar_t>
cudaError_t launch_forward(const CudaInputs& in, void* terms, void* total, void* col_stats, void* workspace,
                           void* counter, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Tile tile = tile_for(in.problem);
  const dim3 grid = grid_for(in, tile, 4, true);
  auto* partials = static_cast<acc_t*>(workspace);
  acc_t* colpart = partials + size_t(grid.x) * grid.y * kPartialsWidth;
  return cuda::launch(blendshape_forward_kernel<scalar_t>, grid, dim3(kThreads), stream, in, tile,
                      static_cast<acc_t*>(terms), static_cast<acc_t*>(total), static_cast<acc_t*>(col_stats),
                      static_cast<unsigned int*>(counter), partials, colpart);
}

template <typename scalar_t>
cudaError_t launch_backward(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream) {
  const Tile tile = tile_for(in.problem);
  return cuda::launch(blendshape_backward_kernel<scalar_t>, grid_for(in, tile, 4, false), dim3(kThreads), stream, in,
                      out, tile);
}

cudaError_t forward_cuda(const CudaInputs& in, void* terms, void* total, void* col_stats, void* workspace,
                         void* counter, cudaStream_t stream) {
  if (in.problem.K > kTile) return cudaErrorInvalidValue;  // checked (with a message) by the caller
  return cuda::dispatch(in.dtype, [&](auto element) {
    return launch_forward<decltype(element)>(in, terms, total, col_stats, workspace, counter, stream);
  });
}

cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream) {
  if (in.problem.K > kTile) return cudaErrorInvalidValue;
  return cuda::dispatch(in.dtype, [&](auto element) { return launch_backward<decltype(element)>(in, out, stream); });
}

}  // namespace blendshape
}  // namespace fusedloss
