// Score loss CUDA kernels. The math (terms, pair activity, searches) is score_math.h's.
//
// forward, up to kCudaAllPairsMax scores: one launch. A block owns 32 scores and walks over all
//           scores in shared-memory tiles; its 8 warps split each tile's partners, and the block
//           adds up each of its scores' active partners over the warps.
// forward, beyond: a keys kernel writes the two sort rows of B (reals: the score, or +inf for a
//           fake; fakes: the score, or -inf for a real), two CUB radix sorts order them, and one
//           launch counts each score's active partners by binary search in the opposite row (the
//           infinities are never active, so they are never counted).
//           In both, each block writes its partial sums; the last block to finish (atomic ticket)
//           reduces them in a fixed order (deterministic) into the terms, the total, the ranking's
//           gradient scale and the status.
// backward: one elementwise launch from the stored signed counts.
// The elementwise kernels (keys, backward) read and write 16 bytes per access where every array
// is contiguous and 16-byte aligned (cuda::load_vec), element by element otherwise.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cmath>

#include "../common/cuda_helpers.cuh"
#include "score_cuda.h"

namespace fusedloss {
namespace score {
namespace {

using cuda::AccOf;
using cuda::block_sum;
using cuda::from_acc;
using cuda::to_acc;
using cuda::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPairScores = 32;  // scores per block of the all-pairs forward: one per lane
// Per-block partial sums (double): regression, classification, ranking, reals, bad scores, bad logits.
enum Partial : int { kRegSum, kClsSum, kRankSum, kReals, kBadScores, kBadLogits, kNumPartials };

template <typename T>
__device__ __forceinline__ typename AccOf<T>::type load(const void* x, int64_t i) {
  return to_acc(static_cast<const T*>(x)[i]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t infinity() {
  return acc_t(INFINITY);
}

bool all_pairs(const Problem& pb) { return has(pb.term_mask, kRanking) && pb.B <= kCudaAllPairsMax; }
bool uses_sort(const Problem& pb) { return has(pb.term_mask, kRanking) && pb.B > kCudaAllPairsMax; }

// All pairs: kPairScores scores per block. Otherwise a thread per score, grid-stride over at most
// 4 blocks per SM.
int forward_blocks(const Problem& pb) {
  const int64_t blocks = all_pairs(pb) ? (pb.B + kPairScores - 1) / kPairScores
                                       : std::min<int64_t>((pb.B + kThreads - 1) / kThreads, 4 * cuda::sm_count());
  return static_cast<int>(std::max<int64_t>(1, blocks));
}

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename acc_t>
size_t sort_temp_bytes(int64_t B) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortKeys(nullptr, bytes, static_cast<const acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
                                 static_cast<int>(B));
  return bytes;
}

// The sort rows: keys[0, B) the real scores (+inf for fakes), keys[row, row + B) the fake scores
// (-inf for reals); row is a multiple of 16 bytes. A thread takes kVecWidth<scalar_t> consecutive
// scores with 16-byte accesses where scores and labels are contiguous and 16-byte aligned; the rest
// (a strided or unaligned view, the tail) goes element by element.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads)
    score_keys_kernel(CudaInputs in, typename AccOf<scalar_t>::type* keys, int64_t row) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int N = cuda::kVecWidth<scalar_t>;
  const auto* scores = static_cast<const scalar_t*>(in.scores);
  const auto* labels = static_cast<const label_t*>(in.labels);
  acc_t* fake_keys = keys + row;
  const bool vec = in.scores_stride == 1 && in.labels_stride == 1 && cuda::aligned16(scores) &&
                   cuda::aligned16(labels) && cuda::aligned16(keys) && cuda::aligned16(fake_keys);
  // 32-bit indices: B < 2^31 (checked on the host), and an index plus one grid's step stays below 2^32.
  const uint32_t n = static_cast<uint32_t>(in.problem.B), vec_end = vec ? n / N * N : 0;
  const uint32_t first = blockIdx.x * kThreads + threadIdx.x, step = gridDim.x * kThreads;
#pragma unroll 1
  for (uint32_t k0 = first * N; k0 < vec_end; k0 += step * N) {
    scalar_t s[N];
    label_t label[N];
    acc_t real_row[N], fake_row[N];
    cuda::load_vec(scores + k0, s);
    cuda::load_vec(labels + k0, label);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const bool real = is_real(to_acc(label[e]));
      real_row[e] = real ? to_acc(s[e]) : infinity<acc_t>();
      fake_row[e] = real ? -infinity<acc_t>() : to_acc(s[e]);
    }
    cuda::store_vec(keys + k0, real_row);
    cuda::store_vec(fake_keys + k0, fake_row);
  }
#pragma unroll 1
  for (uint32_t k = vec_end + first; k < n; k += step) {
    const acc_t s = to_acc(scores[k * in.scores_stride]);
    const bool real = is_real(to_acc(labels[k * in.labels_stride]));
    keys[k] = real ? s : infinity<acc_t>();
    fake_keys[k] = real ? -infinity<acc_t>() : s;
  }
}

// The terms of score k other than the ranking, added to its thread's partial sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_element_terms(const CudaInputs& in, int64_t k, acc_t s, acc_t y, bool real,
                                                  double (&sums)[kNumPartials]) {
  sums[kReals] += real;
  sums[kBadScores] += !isfinite(s);
  sums[kRegSum] += regression_value(s - y, in.problem.smooth_l1);
  if (has(in.problem.term_mask, kClassification)) {
    const int64_t at = k * in.logits_strides[0];
    const acc_t l0 = load<scalar_t>(in.logits, at), l1 = load<scalar_t>(in.logits, at + in.logits_strides[1]);
    sums[kBadLogits] += !(isfinite(l0) && isfinite(l1));
    sums[kClsSum] += cross_entropy(l0, l1, real);
  }
}

// The end of both forward kernels: each block writes its partial sums; the last block to arrive
// (atomic ticket) reduces the partials of all blocks in a fixed order (deterministic) into the
// terms, the total, the ranking's gradient scale and the status.
template <typename acc_t>
__device__ void finish_forward(const CudaInputs& in, const CudaOutputs& out, const double (&sums)[kNumPartials],
                               double* __restrict__ partials, unsigned int* __restrict__ counter) {
  FL_SHARED(double, scratch, [kThreads / 32]);
  FL_SHARED(double, final_sums, [kNumPartials]);
  FL_SHARED(bool, is_last);
  const Problem pb = in.problem;
  const int64_t B = pb.B;
  const int tid = threadIdx.x;
  for (int i = 0; i < kNumPartials; ++i) {
    const double v = block_sum(sums[i], scratch);
    if (tid == 0) partials[blockIdx.x * kNumPartials + i] = v;
  }

  // The last block to arrive reduces the partials of all blocks, in a fixed order.
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  if (tid == 0) atomicExch(counter, 0u);  // every block has arrived: ready for the next launch
  __threadfence();
  const int warp = tid / 32, lane = tid % 32;
  for (int i = warp; i < kNumPartials; i += kThreads / 32) {
    double v = 0;
    for (int blk = lane; blk < static_cast<int>(gridDim.x); blk += 32) v += __ldcg(partials + blk * kNumPartials + i);
    v = warp_sum(v);
    if (lane == 0) final_sums[i] = v;
  }
  __syncthreads();
  if (tid != 0) return;
  const bool rank = has(pb.term_mask, kRanking), cls = has(pb.term_mask, kClassification);
  const double reals = final_sums[kReals], pairs = reals * (double(B) - reals);
  const double scale = pb.ranking_sum ? 1.0 : (pairs > 0 ? 1.0 / pairs : 0.0);
  const double inv_B = B > 0 ? 1.0 / double(B) : 0.0;
  const acc_t values[kNumTerms] = {
      has(pb.term_mask, kRegression) ? static_cast<acc_t>(final_sums[kRegSum] * inv_B) : acc_t(0),
      cls ? static_cast<acc_t>(final_sums[kClsSum] * inv_B) : acc_t(0),
      rank ? static_cast<acc_t>(final_sums[kRankSum] * scale) : acc_t(0)};
  acc_t weighted = 0;
  for (int t = 0; t < kNumTerms; ++t) {
    static_cast<acc_t*>(out.terms)[t] = values[t];
    if (has(pb.term_mask, t)) weighted += static_cast<acc_t>(in.settings[t]) * values[t];
  }
  *static_cast<acc_t*>(out.total) = weighted;
  *out.rank_scale = scale;
  *out.status = (final_sums[kBadScores] > 0 ? kScoresNotFinite : 0) |
                (final_sums[kBadLogits] > 0 ? kLogitsNotFinite : 0) | (isfinite(weighted) ? 0 : kTotalNotFinite);
}

// Forward, B <= kCudaAllPairsMax: a block takes kPairScores scores (lane l of every warp: score
// blockIdx.x * kPairScores + l) and walks all B partners in shared-memory tiles of kThreads; the
// kWarps warps split each tile (warp w compares partners w, w + kWarps, ...: one shared-memory
// broadcast per compare), so a thread makes B / kWarps compares. A score's count is the sum of
// its kWarps warps' counts, taken in warp order (integers: exact).
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads)
    score_all_pairs_kernel(CudaInputs in, CudaOutputs out, double* __restrict__ partials,
                           unsigned int* __restrict__ counter) {
  using acc_t = typename AccOf<scalar_t>::type;
  FL_SHARED(acc_t, tile_score, [kThreads]);
  FL_SHARED(bool, tile_real, [kThreads]);
  FL_SHARED(int, warp_counts, [kWarps][kPairScores]);
  const Problem pb = in.problem;
  const int64_t B = pb.B;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const acc_t margin = static_cast<acc_t>(in.settings[kMargin]);
  const int64_t k = int64_t(blockIdx.x) * kPairScores + lane;
  const bool ok = k < B;
  acc_t s = 0, y = 0;
  bool real = false;
  if (ok) {
    s = load<scalar_t>(in.scores, k * in.scores_stride);
    const auto label = load<label_t>(in.labels, k * in.labels_stride);  // (exact: label_t's own type)
    real = is_real(label);  // the label as given, before rounding to acc_t
    y = static_cast<acc_t>(label);
  }
  double sums[kNumPartials] = {};
  if (has(pb.term_mask, kRanking)) {
    int count = 0;
    for (int64_t t0 = 0; t0 < B; t0 += kThreads) {
      __syncthreads();
      if (t0 + tid < B) {
        tile_score[tid] = load<scalar_t>(in.scores, (t0 + tid) * in.scores_stride);
        tile_real[tid] = is_real(load<label_t>(in.labels, (t0 + tid) * in.labels_stride));
      }
      __syncthreads();
      const int len = static_cast<int>(B - t0 < kThreads ? B - t0 : kThreads);
#pragma unroll 8
      for (int i = warp; i < len; i += kWarps) {
        const acc_t other = tile_score[i];
        count += tile_real[i] != real && (real ? active(margin, s, other) : active(margin, other, s));
      }
    }
    warp_counts[warp][lane] = count;
    __syncthreads();
    if (warp == 0 && ok) {
      int64_t n = 0;
      for (int w = 0; w < kWarps; ++w) n += warp_counts[w][lane];
      const int64_t signed_count = real ? -n : n;
      out.counts[k] = static_cast<int32_t>(signed_count);
      sums[kRankSum] += ranking_share(signed_count, static_cast<double>(margin), static_cast<double>(s));
    }
  }
  if (warp == 0 && ok) add_element_terms<scalar_t>(in, k, s, y, real, sums);
  finish_forward<acc_t>(in, out, sums, partials, counter);
}

// Forward, beyond kCudaAllPairsMax (or without the ranking): a thread takes a score (grid-stride)
// and counts its active partners by binary search in the opposite sorted row.
template <typename scalar_t, typename label_t, bool kSorted>
__global__ void __launch_bounds__(kThreads)
    score_forward_kernel(CudaInputs in, CudaOutputs out, const typename AccOf<scalar_t>::type* __restrict__ sorted,
                         double* __restrict__ partials, unsigned int* __restrict__ counter) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Problem pb = in.problem;
  const int64_t B = pb.B;
  const acc_t margin = static_cast<acc_t>(in.settings[kMargin]);
  double sums[kNumPartials] = {};
  for (int64_t k = blockIdx.x * int64_t(kThreads) + threadIdx.x; k < B; k += int64_t(gridDim.x) * kThreads) {
    const acc_t s = load<scalar_t>(in.scores, k * in.scores_stride);
    const auto label = load<label_t>(in.labels, k * in.labels_stride);  // (exact: label_t's own type)
    const bool real = is_real(label);  // the label as given, before rounding to acc_t
    const acc_t y = static_cast<acc_t>(label);
    if (kSorted) {
      const int64_t n = real ? active_fakes(margin, s, sorted + B, B) : active_reals(margin, s, sorted, B);
      const int64_t signed_count = real ? -n : n;
      out.counts[k] = static_cast<int32_t>(signed_count);
      sums[kRankSum] += ranking_share(signed_count, static_cast<double>(margin), static_cast<double>(s));
    }
    add_element_terms<scalar_t>(in, k, s, y, real, sums);
  }
  finish_forward<acc_t>(in, out, sums, partials, counter);
}

// The backward's factors: d(loss)/d(term t) = grad_terms[t] + weight_t grad_total, divided by the
// term's count (B, or the ranking's pairs via rank_scale).
template <typename acc_t>
struct GradScales {
  acc_t reg, cls, rank;
};

// d loss / d s of one score: reg regression'(s - y) + rank signed_count.
template <typename acc_t>
__device__ __forceinline__ acc_t score_grad(const GradScales<acc_t>& c, acc_t s, acc_t y, int32_t signed_count,
                                            bool smooth_l1) {
  return c.reg * regression_grad(s - y, smooth_l1) + c.rank * static_cast<acc_t>(signed_count);
}

// d loss / d (l0, l1): d CE / d l[other] = sigmoid(l[other] - l[class]) = -d CE / d l[class].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void logits_grad(acc_t c_cls, acc_t l0, acc_t l1, bool real, scalar_t& g0, scalar_t& g1) {
  const acc_t g_other = c_cls * sigmoid(logit_gap(l0, l1, real));
  g0 = from_acc<scalar_t>(real ? g_other : -g_other);
  g1 = from_acc<scalar_t>(real ? -g_other : g_other);
}

// Elementwise over B. Where every array it reads or writes is contiguous and 16-byte aligned, a
// thread takes kVecWidth<scalar_t> consecutive elements with 16-byte accesses (grad_logits and
// logits: two such rows per 16 bytes of fp32); the rest (a strided or unaligned view, the tail
// past the last whole vector) goes element by element.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kThreads) score_backward_kernel(CudaInputs in, CudaGradients g) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int N = cuda::kVecWidth<scalar_t>;
  const Problem pb = in.problem;
  const int64_t B = pb.B;
  // A null gradient reads as 0.
  const acc_t g_total = g.grad_total != nullptr ? *static_cast<const acc_t*>(g.grad_total) : acc_t(0);
  const acc_t* gt = static_cast<const acc_t*>(g.grad_terms);
  acc_t coef[kNumTerms];
#pragma unroll
  for (int t = 0; t < kNumTerms; ++t)
    coef[t] = (gt != nullptr ? gt[t * g.grad_terms_stride] : acc_t(0)) + static_cast<acc_t>(in.settings[t]) * g_total;
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  const GradScales<acc_t> c = {
      has(pb.term_mask, kRegression) ? coef[kRegression] * inv_B : acc_t(0),
      has(pb.term_mask, kClassification) ? coef[kClassification] * inv_B : acc_t(0),
      g.counts ? static_cast<acc_t>(static_cast<double>(coef[kRanking]) * *g.rank_scale) : acc_t(0)};
  const auto* scores = static_cast<const scalar_t*>(in.scores);
  const auto* labels = static_cast<const label_t*>(in.labels);
  const auto* logits = static_cast<const scalar_t*>(in.logits);
  auto* gs = static_cast<scalar_t*>(g.grad_scores);
  auto* gl = static_cast<scalar_t*>(g.grad_logits);

  const bool vec = in.labels_stride == 1 && cuda::aligned16(labels) && cuda::aligned16(g.counts) &&
                   cuda::aligned16(gs) && (!gs || (in.scores_stride == 1 && cuda::aligned16(scores))) &&
                   cuda::aligned16(gl) &&
                   (!gl || (in.logits_strides[0] == 2 && in.logits_strides[1] == 1 && cuda::aligned16(logits)));
  // 32-bit indices: B < 2^31 (checked on the host), and an index plus one grid's step stays below 2^32.
  const uint32_t n = static_cast<uint32_t>(B), vec_end = vec ? n / N * N : 0;
  const uint32_t first = blockIdx.x * kThreads + threadIdx.x, step = gridDim.x * kThreads;
#pragma unroll 1
  for (uint32_t k0 = first * N; k0 < vec_end; k0 += step * N) {
    label_t label[N];
    cuda::load_vec(labels + k0, label);
    if (gs) {
      scalar_t s[N], out[N];
      int32_t counts[N] = {};
      cuda::load_vec(scores + k0, s);
      if (g.counts) cuda::load_vec(g.counts + k0, counts);
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const acc_t y = static_cast<acc_t>(to_acc(label[e]));
        out[e] = from_acc<scalar_t>(score_grad(c, to_acc(s[e]), y, counts[e], pb.smooth_l1));
      }
      cuda::store_vec(gs + k0, out);
    }
    if (gl) {
      scalar_t l[2 * N], out[2 * N];
      cuda::load_vec(logits + 2 * k0, l);
#pragma unroll
      for (int e = 0; e < N; ++e)
        logits_grad(c.cls, to_acc(l[2 * e]), to_acc(l[2 * e + 1]), is_real(to_acc(label[e])), out[2 * e],
                    out[2 * e + 1]);
      cuda::store_vec(gl + 2 * k0, out);
    }
  }
#pragma unroll 1
  for (uint32_t k = vec_end + first; k < n; k += step) {
    const auto label = to_acc(labels[k * in.labels_stride]);  // label_t's own arithmetic type
    if (gs) {
      const acc_t s = to_acc(scores[k * in.scores_stride]);
      gs[k] = from_acc<scalar_t>(score_grad(c, s, static_cast<acc_t>(label), g.counts ? g.counts[k] : 0, pb.smooth_l1));
    }
    if (gl) {
      const int64_t at = k * in.logits_strides[0];
      logits_grad(c.cls, to_acc(logits[at]), to_acc(logits[at + in.logits_strides[1]]), is_real(label), gl[2 * k],
                  gl[2 * k + 1]);
    }
  }
}

// f(scalar_t{}, label_t{}): labels are in scores' dtype, in the arithmetic type, or in float64.
template <typename F>
cudaError_t dispatch(const CudaInputs& in, F&& f) {
  return cuda::dispatch(in.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    using acc_t = typename AccOf<scalar_t>::type;
    if (in.labels_dtype == in.dtype) return f(scalar_t{}, scalar_t{});
    if (in.labels_dtype == DType::kFloat64) return f(scalar_t{}, double{});
    return f(scalar_t{}, acc_t{});
  });
}

size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

size_t forward_workspace_bytes(const CudaInputs& in) {
  const Problem& pb = in.problem;
  const bool sorted = uses_sort(pb);
  size_t bytes = aligned(size_t(forward_blocks(pb)) * kNumPartials * sizeof(double));
  if (sorted) {
    const size_t temp = in.dtype == DType::kFloat64 ? sort_temp_bytes<double>(pb.B) : sort_temp_bytes<float>(pb.B);
    // the key rows (each 256-byte aligned), the sorted rows, CUB's scratch
    bytes += 2 * aligned(size_t(pb.B) * acc_bytes(in.dtype)) + aligned(2 * size_t(pb.B) * acc_bytes(in.dtype)) +
             aligned(temp);
  }
  return bytes;
}

cudaError_t forward_cuda(const CudaInputs& in, const CudaOutputs& out, void* workspace, void* counter,
                         cudaStream_t stream) {
  return dispatch(in, [&](auto element, auto label) -> cudaError_t {
    using scalar_t = decltype(element);
    using label_t = decltype(label);
    using acc_t = typename AccOf<scalar_t>::type;
    const Problem& pb = in.problem;
    const int blocks = forward_blocks(pb);
    auto* bytes = static_cast<char*>(workspace);
    auto* partials = reinterpret_cast<double*>(bytes);
    bytes += aligned(size_t(blocks) * kNumPartials * sizeof(double));
    auto* counts = static_cast<unsigned int*>(counter);
    if (all_pairs(pb)) {
      return cuda::launch(score_all_pairs_kernel<scalar_t, label_t>, dim3(blocks), dim3(kThreads), stream, in, out,
                          partials, counts);
    }
    if (!uses_sort(pb)) {  // no ranking
      return cuda::launch(score_forward_kernel<scalar_t, label_t, false>, dim3(blocks), dim3(kThreads), stream, in,
                          out, static_cast<const acc_t*>(nullptr), partials, counts);
    }
    const int64_t B = pb.B;
    auto* keys = reinterpret_cast<acc_t*>(bytes);
    const int64_t key_row = int64_t(aligned(size_t(B) * sizeof(acc_t)) / sizeof(acc_t));
    bytes += 2 * key_row * sizeof(acc_t);
    auto* rows = reinterpret_cast<acc_t*>(bytes);
    bytes += aligned(2 * size_t(B) * sizeof(acc_t));
    size_t temp_bytes = sort_temp_bytes<acc_t>(B);
    cudaError_t status = cuda::launch(score_keys_kernel<scalar_t, label_t>, dim3(blocks), dim3(kThreads), stream, in,
                                      keys, key_row);
    for (int r = 0; r < 2 && status == cudaSuccess; ++r)
      status = cub::DeviceRadixSort::SortKeys(bytes, temp_bytes, keys + r * key_row, rows + r * B, static_cast<int>(B),
                                              0, int(sizeof(acc_t) * 8), stream);
    if (status != cudaSuccess) return status;
    return cuda::launch(score_forward_kernel<scalar_t, label_t, true>, dim3(blocks), dim3(kThreads), stream, in, out,
                        static_cast<const acc_t*>(rows), partials, counts);
  });
}

cudaError_t backward_cuda(const CudaInputs& in, const CudaGradients& out, cudaStream_t stream) {
  return dispatch(in, [&](auto element, auto label) -> cudaError_t {
    const int64_t blocks = std::min<int64_t>((in.problem.B + kThreads - 1) / kThreads, 8 * cuda::sm_count());
    return cuda::launch(score_backward_kernel<decltype(element), decltype(label)>,
                        dim3(static_cast<unsigned>(std::max<int64_t>(1, blocks))), dim3(kThreads), stream, in, out);
  });
}

}  // namespace score
}  // namespace fusedloss
