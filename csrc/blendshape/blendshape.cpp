// Blendshape loss: operator schemas, C++ CPU kernels, and the CUDA dispatch (blendshape_cuda.cu).
//
// fusedloss::blendshape_forward  reads pred, target (and raw_pred, prev_pred) once and returns the
//                                computed terms in TERMS order, their weighted total, and the
//                                column statistics of the default perceptual form.
// fusedloss::blendshape_backward writes the gradients of pred, target and raw_pred in one pass.
// The math is described once, in blendshape_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/autograd.h"
#include "blendshape_math.h"
#include "../common/macros.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/arrival_counter.h"
#include "../common/cuda_dtype_of.h"
#include "blendshape_cuda.h"
#endif

namespace fusedloss {
namespace blendshape {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_like(const char* name, const Tensor& x, const Tensor& pred) {
  TORCH_CHECK(x.sizes() == pred.sizes() && x.scalar_type() == pred.scalar_type() && x.device() == pred.device(),
              "blendshape: ", name, " must match pred's shape, dtype and device");
}

Problem check_inputs(const Tensor& pred, const Tensor& target, const OptTensor& raw, const OptTensor& prev,
                     const Tensor& settings, const OptTensor& group_coef, const OptTensor& gram, int64_t J,
                     int64_t term_mask) {
  TORCH_CHECK(pred.dim() == 2 || pred.dim() == 3, "blendshape: pred must be [B, K] or [B, T, K]");
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "blendshape: pred must be floating point");
  TORCH_CHECK(term_mask >= 0 && term_mask < (1 << kNumTerms), "blendshape: bad term mask ", term_mask);
  check_like("target", target, pred);
  const int64_t K = pred.size(-1), T = pred.dim() == 3 ? pred.size(1) : 1;
  TORCH_CHECK(K >= 1 && T >= 1, "blendshape: pred must have at least one frame and one blendshape");
  TORCH_CHECK(settings.dim() == 1 && settings.size(0) == kNumSettings && settings.scalar_type() == at::kDouble &&
                  settings.is_contiguous() && settings.device() == pred.device(),
              "blendshape: settings must be a contiguous float64 [8] tensor on pred's device");
  if (has(term_mask, kSmoothing)) {
    TORCH_CHECK(raw.has_value(), "blendshape: raw_pred is required for the smoothing term");
    check_like("raw_pred", *raw, pred);
  }
  if (has(term_mask, kConsistency)) {
    TORCH_CHECK(prev.has_value(), "blendshape: prev_pred is required for the consistency term");
    check_like("prev_pred", *prev, pred);
  }
  TORCH_CHECK(!has(term_mask, kTemporal) || pred.dim() == 3, "blendshape: the temporal term needs [B, T, K] input");
  if (group_coef.has_value())
    TORCH_CHECK(group_coef->dim() == 1 && group_coef->scalar_type() == at::kDouble && group_coef->is_contiguous() &&
                    group_coef->device() == pred.device(),
                "blendshape: group_coef must be a contiguous float64 1-D tensor on pred's device");
  if (has(term_mask, kLandmark)) {
    TORCH_CHECK(gram.has_value() && gram->dim() == 2 && gram->size(0) == K && gram->size(1) == K &&
                    gram->scalar_type() == at::kDouble && gram->is_contiguous() && gram->device() == pred.device(),
                "blendshape: landmark_gram must be a contiguous float64 [K, K] tensor on pred's device");
    TORCH_CHECK(J >= 1, "blendshape: landmark_rows must be >= 1");
  }
  return Problem{pred.size(0), T, K, J, static_cast<int>(term_mask), group_coef.has_value()};
}

// Strides of x viewed as [B, T, K].
std::array<int64_t, 3> strides3(const Tensor& x) {
  if (x.dim() == 3) return {x.stride(0), x.stride(1), x.stride(2)};
  return {x.stride(0), 0, x.stride(1)};
}

bool needs_col_stats(const Problem& p) { return has(p.term_mask, kPerceptual) && !p.group_form; }

// ----------------------------------------------------------------------------------------------
// CPU kernels
// ----------------------------------------------------------------------------------------------

// The flat loops carry AVX2+FMA clones of their own (a call per group of >= 512 values).
#define FL_LOOP FL_CPU_CLONES static

// The CPU kernels work on flat groups: G consecutive batch elements, i.e. G slabs of C = T*K values
// (position i of a group is column c = i % C), processed as one vector of G*C values, so every
// loop is long and vectorises (G is chosen so G*C is a multiple of the vector width and >= 512).
// Each input of a group is read in place when it is a contiguous slab of acc_t, else gathered
// (converted) into a buffer.

template <typename scalar_t>
struct Inputs {
  const scalar_t* x[4];  // pred, target, raw_pred, prev_pred (null when absent)
  std::array<int64_t, 3> s[4];
  int64_t T, K;
};

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const Tensor& pred, const Tensor& target, const OptTensor& raw, const OptTensor& prev) {
  Inputs<scalar_t> in{};
  const Tensor* xs[4] = {&pred, &target, raw ? &*raw : nullptr, prev ? &*prev : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (!xs[i]) continue;
    in.x[i] = xs[i]->const_data_ptr<scalar_t>();
    in.s[i] = strides3(*xs[i]);
  }
  in.T = pred.dim() == 3 ? pred.size(1) : 1;
  in.K = pred.size(-1);
  return in;
}

// Input i for batch elements [b0, b0 + nb), columns [c0, c0 + len) of each (c0, len multiples of
// K), as nb*len acc_t values: in place when possible, else gathered into buf.
template <typename acc_t, typename scalar_t>
const acc_t* group_values(const Inputs<scalar_t>& in, int i, int64_t b0, int64_t nb, int64_t c0, int64_t len,
                          acc_t* buf) {
  const auto& s = in.s[i];
  const int64_t C = in.T * in.K, t0 = c0 / in.K, rows = len / in.K;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const bool flat_slab = s[2] == 1 && (in.T == 1 || s[1] == in.K);  // (t, k) at offset t*K + k
    if (flat_slab && (nb == 1 || (s[0] == C && len == C))) return in.x[i] + b0 * s[0] + c0;
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t t = 0; t < rows; ++t) {
      const scalar_t* row = in.x[i] + (b0 + b) * s[0] + (t0 + t) * s[1];
      acc_t* out = buf + b * len + t * in.K;
      for (int64_t k = 0; k < in.K; ++k) out[k] = static_cast<acc_t>(row[k * s[2]]);
    }
  return buf;
}

int64_t group_size(int64_t C) {
  int64_t g = 1;
  while ((g * C) % 8 != 0) ++g;  // whole vectors of floats
  const int64_t step = g;
  while (g * C < 512) g += step;
  return g;
}

// Per-thread buffers of one group of L values (uninitialised; e has K values of zeros each side).
template <typename acc_t>
struct Buffers {
  Buffers(int64_t L, int64_t K) : K(K), data(new acc_t[7 * (L + K) + 2 * K]) {
    for (int i = 0; i < 5; ++i) values[i] = data.get() + i * (L + K);
    e = data.get() + 5 * (L + K) + K;  // e[-K .. L + K)
    aux = data.get() + 6 * (L + K) + 2 * K;
    std::fill(e - K, e, acc_t(0));
    std::fill(e + L, e + L + K, acc_t(0));
  }
  int64_t K;
  std::unique_ptr<acc_t[]> data;
  acc_t* values[5];  // conversion buffers: pred, target, raw_pred, prev_pred, and one spare
  acc_t* e;
  acc_t* aux;        // a row of G e, or a gradient row
};

// Per-position constants of a group, the column's value repeated for each of the G slabs.
template <typename acc_t>
std::vector<acc_t> tiled(const std::vector<acc_t>& per_column, int64_t G) {
  std::vector<acc_t> out(per_column.size() * G);
  for (int64_t g = 0; g < G; ++g) std::copy(per_column.begin(), per_column.end(), out.begin() + g * per_column.size());
  return out;
}

// y = G e for a symmetric [K, K] G (axpy over rows: vectorises without reassociation).
template <typename acc_t>
inline void gram_times(int64_t K, const acc_t* FL_R G, const acc_t* FL_R e, acc_t* FL_R y) {
  std::fill(y, y + K, acc_t(0));
  for (int64_t j = 0; j < K; ++j) {
    const acc_t ej = e[j];
    const acc_t* FL_R g = G + j * K;
    for (int64_t k = 0; k < K; ++k) y[k] += g[k] * ej;
  }
}

// The forward sums of one group of n values, added to sums (kNumSums) and to the column sums
// colT, colS2 (position-wise, default perceptual form).
template <typename acc_t, bool kCols, bool kGroups, bool kKeepE>
FL_LOOP void group_sums(int64_t n, const acc_t* FL_R p, const acc_t* FL_R q, acc_t thr, const acc_t* FL_R gcoef,
                        acc_t* FL_R e_out, acc_t* FL_R colT, acc_t* FL_R colS2, double* FL_R sums) {
  acc_t sq = 0, ab = 0, act = 0, grp = 0;
#pragma omp simd reduction(+ : sq, ab, act, grp)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t e = p[i] - q[i];
    if constexpr (kKeepE) e_out[i] = e;  // for the temporal and landmark terms
    if constexpr (!kCols) sq += e * e;     // (else summed from colS2 at the end)
    ab += std::abs(e);
    act += acc_t((p[i] > thr) != (q[i] > thr));
    if constexpr (kGroups) grp += gcoef[i] * e * e;
    if constexpr (kCols) {
      colT[i] += q[i];
      colS2[i] += e * e;
    }
  }
  sums[kSqErr] += sq;
  sums[kAbsErr] += ab;
  sums[kActive] += act;
  sums[kGroupSq] += grp;
}

// sum of (e[i + K] - e[i])^2 over the positions i with a next frame (has_next[i] = 1).
template <typename acc_t>
FL_LOOP acc_t temporal_sum(int64_t n, int64_t K, const acc_t* FL_R e, const acc_t* FL_R has_next) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = e[i + K] - e[i];
    s += has_next[i] * d * d;
  }
  return s;
}

template <typename acc_t>
FL_LOOP acc_t abs_difference_sum(int64_t n, const acc_t* FL_R a, const acc_t* FL_R b) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += std::abs(a[i] - b[i]);
  return s;
}

template <typename acc_t>
FL_LOOP acc_t square_difference_sum(int64_t n, const acc_t* FL_R a, const acc_t* FL_R b) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return s;
}

template <typename acc_t>
inline acc_t dot(int64_t n, const acc_t* FL_R a, const acc_t* FL_R b) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Per-position constants of the forward and backward (each G*C long, see tiled()).
template <typename acc_t>
struct Positions {
  std::vector<acc_t> gcoef;     // group coefficient of the column's k
  std::vector<acc_t> has_next;  // 1 where t + 1 < T
  std::vector<acc_t> has_prev;  // 1 where t >= 1
};

// The tables a problem's terms use (empty otherwise), without a division per position.
template <typename acc_t>
Positions<acc_t> positions(const Problem& pb, const OptTensor& group_coef, int64_t G) {
  const int64_t C = pb.T * pb.K;
  Positions<acc_t> out;
  if (has(pb.term_mask, kPerceptual) && pb.group_form) {
    std::vector<acc_t> gcoef(C, acc_t(0));
    const double* gc = group_coef->const_data_ptr<double>();
    const int64_t len = std::min<int64_t>(pb.K, group_coef->numel());
    for (int64_t t = 0; t < pb.T; ++t)
      for (int64_t k = 0; k < len; ++k) gcoef[t * pb.K + k] = static_cast<acc_t>(gc[k]);
    out.gcoef = tiled(gcoef, G);
  }
  if (has(pb.term_mask, kTemporal)) {
    std::vector<acc_t> next(C, acc_t(1)), prev(C, acc_t(1));
    std::fill(next.end() - pb.K, next.end(), acc_t(0));     // t = T - 1
    std::fill(prev.begin(), prev.begin() + pb.K, acc_t(0));  // t = 0
    out.has_next = tiled(next, G);
    out.has_prev = tiled(prev, G);
  }
  return out;
}

template <typename acc_t>
std::vector<acc_t> gram_of(const OptTensor& gram, const Problem& pb) {
  std::vector<acc_t> out;
  if (has(pb.term_mask, kLandmark)) {
    const double* g = gram->const_data_ptr<double>();
    out.assign(g, g + pb.K * pb.K);
  }
  return out;
}

// Forward sums of batch elements [b0, b1), time rows [t0, t1), in groups of G batch elements
// (G > 1 only over whole slabs).
template <typename scalar_t, typename acc_t, bool kCols, bool kGroups>
void forward_groups(const Inputs<scalar_t>& in, const Problem& pb, acc_t thr, const Positions<acc_t>& pos,
                    const acc_t* gram, int64_t G, int64_t b0, int64_t b1, int64_t t0, int64_t t1, double* sums,
                    acc_t* colT, acc_t* colS2, Buffers<acc_t>& buf) {
  const int64_t K = pb.K, c0 = t0 * K, len = (t1 - t0) * K;
  const int term_mask = pb.term_mask;
  const bool keep_e = has(term_mask, kTemporal) || has(term_mask, kLandmark);
  const acc_t* next = has(term_mask, kTemporal) ? pos.has_next.data() + c0 : nullptr;
  const acc_t* gcoef = kGroups ? pos.gcoef.data() + c0 : nullptr;
  for (int64_t g0 = b0; g0 < b1; g0 += G) {
    const int64_t nb = std::min(G, b1 - g0), n = nb * len;
    const acc_t* p = group_values<acc_t>(in, 0, g0, nb, c0, len, buf.values[0]);
    const acc_t* q = group_values<acc_t>(in, 1, g0, nb, c0, len, buf.values[1]);
    if (keep_e) group_sums<acc_t, kCols, kGroups, true>(n, p, q, thr, gcoef, buf.e, colT, colS2, sums);
    else group_sums<acc_t, kCols, kGroups, false>(n, p, q, thr, gcoef, buf.e, colT, colS2, sums);
    if (has(term_mask, kTemporal)) {
      // e of the row after the span (another task's), else zeros: has_next masks the last frame.
      acc_t* after = buf.e + n;
      if (t1 < pb.T) {
        const acc_t* pn = group_values<acc_t>(in, 0, g0, 1, t1 * K, K, buf.values[2]);
        const acc_t* qn = group_values<acc_t>(in, 1, g0, 1, t1 * K, K, buf.values[3]);
        for (int64_t k = 0; k < K; ++k) after[k] = pn[k] - qn[k];
      } else {
        std::fill(after, after + K, acc_t(0));
      }
      sums[kTemporalSq] += temporal_sum(n, K, buf.e, next);
    }
    if (has(term_mask, kLandmark))
      for (int64_t r = 0; r < n / K; ++r) {
        gram_times(K, gram, buf.e + r * K, buf.aux);
        sums[kLandmarkSq] += dot(K, buf.e + r * K, buf.aux);
      }
    if (has(term_mask, kSmoothing))
      sums[kSmoothAbs] += abs_difference_sum(n, p, group_values<acc_t>(in, 2, g0, nb, c0, len, buf.values[2]));
    if (has(term_mask, kConsistency))
      sums[kConsistencySq] += square_difference_sum(n, p, group_values<acc_t>(in, 3, g0, nb, c0, len, buf.values[3]));
  }
}

// Batch chunks fixed by the problem's shape (never by the thread count) keep the sums deterministic:
// at most 64, of at least 16K values each.
int64_t batch_chunk(int64_t B, int64_t C) {
  return std::max<int64_t>({1, (B + 63) / 64, (16384 + C - 1) / C});
}


// The forward's tasks: batch chunks x time segments, fixed by the problem's shape (never by the thread
// count), so the sums are deterministic. Long [T, K] slabs are split in time segments over the whole
// batch (each column's sum then stays in one task); otherwise the batch is split in chunks.
struct Tasks {
  int64_t chunk, nchunks, seg_rows, nseg;
};
Tasks forward_tasks(const Problem& pb) {
  const int64_t C = pb.T * pb.K;
  const int64_t wanted = std::clamp<int64_t>((std::max<int64_t>(pb.B, 1) * C + 16383) / 16384, 1, 64);
  Tasks t{};
  t.nseg = (pb.T > 1 && C >= 4096) ? std::min(pb.T, wanted) : 1;
  t.seg_rows = (pb.T + t.nseg - 1) / t.nseg;
  t.nseg = (pb.T + t.seg_rows - 1) / t.seg_rows;
  t.chunk = t.nseg > 1 ? std::max<int64_t>(pb.B, 1) : batch_chunk(pb.B, C);
  t.nchunks = std::max<int64_t>(1, (pb.B + t.chunk - 1) / t.chunk);
  return t;
}

template <typename scalar_t>
void forward_cpu(const Inputs<scalar_t>& in, const Problem& pb, const double* settings, const OptTensor& group_coef,
                 const OptTensor& gram, Tensor& terms, Tensor& total, Tensor& col_stats) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t K = pb.K, C = pb.T * K;
  const Tasks tasks = forward_tasks(pb);
  const int64_t nchunks = tasks.nchunks, ntasks = nchunks * tasks.nseg;
  const int64_t G = tasks.nseg > 1 ? 1 : group_size(C), span = tasks.seg_rows * K;
  const bool cols = needs_col_stats(pb), groups = has(pb.term_mask, kPerceptual) && pb.group_form;
  const acc_t thr = threshold_as<scalar_t, acc_t>(
      settings[kThreshold], [](float x) { return static_cast<acc_t>(static_cast<scalar_t>(x)); });
  const Positions<acc_t> pos = positions<acc_t>(pb, group_coef, G);
  const std::vector<acc_t> G_mat = gram_of<acc_t>(gram, pb);
  std::vector<double> sums(ntasks * kNumSums, 0.0);
  // Column sums of each batch chunk ([nchunks][2][C]), each span written whole by its task.
  std::unique_ptr<acc_t[]> col_partial(cols ? new acc_t[nchunks * 2 * C] : nullptr);
  at::parallel_for(0, ntasks, 1, [&](int64_t k0, int64_t k1) {
    Buffers<acc_t> buf(G * span, K);
    std::vector<acc_t> colT(cols ? G * span : 0), colS2(cols ? G * span : 0);
    for (int64_t task = k0; task < k1; ++task) {
      const int64_t c = task / tasks.nseg, seg = task % tasks.nseg;
      const int64_t b0 = c * tasks.chunk, b1 = std::min(pb.B, b0 + tasks.chunk);
      const int64_t t0 = seg * tasks.seg_rows, t1 = std::min(pb.T, t0 + tasks.seg_rows), len = (t1 - t0) * K;
      std::fill(colT.begin(), colT.end(), acc_t(0));
      std::fill(colS2.begin(), colS2.end(), acc_t(0));
      double* s = sums.data() + task * kNumSums;
      if (cols) forward_groups<scalar_t, acc_t, true, false>(in, pb, thr, pos, G_mat.data(), G, b0, b1, t0, t1, s, colT.data(), colS2.data(), buf);
      else if (groups) forward_groups<scalar_t, acc_t, false, true>(in, pb, thr, pos, G_mat.data(), G, b0, b1, t0, t1, s, nullptr, nullptr, buf);
      else forward_groups<scalar_t, acc_t, false, false>(in, pb, thr, pos, G_mat.data(), G, b0, b1, t0, t1, s, nullptr, nullptr, buf);
      if (cols) {  // fold the G slabs into the chunk's column sums of this span
        acc_t* out = col_partial.get() + c * 2 * C + t0 * K;
        std::copy(colT.begin(), colT.begin() + len, out);
        std::copy(colS2.begin(), colS2.begin() + len, out + C);
        for (int64_t g = 1; g < G; ++g)
          for (int64_t i = 0; i < len; ++i) {
            out[i] += colT[g * len + i];
            out[C + i] += colS2[g * len + i];
          }
      }
    }
  });
  double total_sums[kNumSums] = {};
  for (int64_t task = 0; task < ntasks; ++task)
    for (int s = 0; s < kNumSums; ++s) total_sums[s] += sums[task * kNumSums + s];
  double weighted = 0;
  if (cols) {
    // Each column summed over the chunks in order (in parallel over columns: still deterministic),
    // then the weighted and squared-error sums over fixed column blocks.
    acc_t* w_out = col_stats.data_ptr<acc_t>();
    acc_t* s2_out = w_out + C;
    constexpr int64_t kBlock = 4096;
    const int64_t blocks = (C + kBlock - 1) / kBlock;
    std::vector<double> block_weighted(blocks), block_sq(blocks);
    const acc_t* partial = col_partial.get();
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (kBlock * nchunks)), [&](int64_t k0, int64_t k1) {
      for (int64_t blk = k0; blk < k1; ++blk) {
        double wsum = 0, sq = 0;
        for (int64_t i = blk * kBlock; i < std::min(C, (blk + 1) * kBlock); ++i) {
          acc_t colT = 0, colS2 = 0;
          for (int64_t c = 0; c < nchunks; ++c) {
            colT += partial[c * 2 * C + i];
            colS2 += partial[c * 2 * C + C + i];
          }
          const acc_t w = pb.B > 0 ? colT / static_cast<acc_t>(pb.B) : acc_t(0);
          w_out[i] = w;
          s2_out[i] = colS2;
          wsum += double(w) * double(w) * double(colS2);
          sq += colS2;
        }
        block_weighted[blk] = wsum;
        block_sq[blk] = sq;
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk) {
      weighted += block_weighted[blk];
      total_sums[kSqErr] += block_sq[blk];
    }
  }
  acc_t* out = terms.data_ptr<acc_t>();
  double sum = 0;
  for (int term = 0; term < kNumTerms; ++term) {
    if (!has(pb.term_mask, term)) continue;
    const double value = term_value<double>(pb, term, total_sums, weighted);
    out[term_index(pb.term_mask, term)] = static_cast<acc_t>(value);
    sum += settings[term] * value;
  }
  *total.data_ptr<acc_t>() = static_cast<acc_t>(sum);
}

template <typename acc_t>
struct Coefficients {
  acc_t mse, l1, perc, temporal, landmark, smoothing, consistency;
};

// Per-position constants of the backward, besides Positions.
template <typename acc_t>
struct BackwardPositions {
  std::vector<acc_t> perc_scale;  // 2 c_perc w[c]^2, or 2 c_perc group_coef[k]
  std::vector<acc_t> through_w;   // 2 c_perc w[c] colS2[c] / B (d/dtarget via the importance weights)
};

// d/de of one group (n values) into g; see blendshape_math.h. e is read from e_buf (which has K
// values of padding each side) with the temporal term, else formed from p and q.
template <typename acc_t, bool kPerc, bool kTemporal>
FL_LOOP void group_gradient(int64_t n, int64_t K, const acc_t* FL_R p, const acc_t* FL_R q, const acc_t* FL_R e_buf,
                            const Coefficients<acc_t>& c, const acc_t* FL_R perc_scale, const acc_t* FL_R has_prev,
                            const acc_t* FL_R has_next, acc_t* FL_R g) {
  const acc_t two_mse = acc_t(2) * c.mse, two_temporal = acc_t(2) * c.temporal, l1 = c.l1;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = kTemporal ? e_buf[i] : p[i] - q[i];
    acc_t v = two_mse * x + l1 * (acc_t(x > acc_t(0)) - acc_t(x < acc_t(0)));
    if constexpr (kPerc) v += perc_scale[i] * x;
    if constexpr (kTemporal) v += two_temporal * (has_prev[i] * (x - e_buf[i - K]) - has_next[i] * (e_buf[i + K] - x));
    g[i] = v;
  }
}

template <typename scalar_t, typename acc_t>
FL_LOOP void store(int64_t n, const acc_t* FL_R x, acc_t factor, const acc_t* FL_R add, scalar_t* FL_R out) {
  if (add) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(factor * x[i] + add[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(factor * x[i]);
  }
}

// Gradients of batch elements [b0, b1) in groups of G.
template <typename scalar_t, typename acc_t, bool kPerc, bool kTemporal>
void backward_groups(const Inputs<scalar_t>& in, const Problem& pb, const Coefficients<acc_t> c,
                                   const Positions<acc_t>& pos, const BackwardPositions<acc_t>& bpos,
                                   const acc_t* gram, int64_t G, int64_t b0, int64_t b1, scalar_t* gp, scalar_t* gq,
                                   scalar_t* graw, Buffers<acc_t>& buf, acc_t* gbuf) {
  const int64_t C = pb.T * pb.K, K = pb.K;
  const int term_mask = pb.term_mask;
  for (int64_t g0 = b0; g0 < b1; g0 += G) {
    const int64_t nb = std::min(G, b1 - g0), n = nb * C, at = g0 * C;
    const acc_t* p = group_values<acc_t>(in, 0, g0, nb, 0, C, buf.values[0]);
    const acc_t* q = group_values<acc_t>(in, 1, g0, nb, 0, C, buf.values[1]);
    acc_t* FL_R e = buf.e;
    if (kTemporal || has(term_mask, kLandmark)) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) e[i] = p[i] - q[i];
      std::fill(e + n, e + n + K, acc_t(0));  // past the group (masked by has_next anyway)
    }
    // d/de goes straight into d/dpred's memory when that has the arithmetic type.
    const bool direct = std::is_same_v<scalar_t, acc_t> && gp != nullptr;
    acc_t* g = direct ? reinterpret_cast<acc_t*>(gp + at) : gbuf;
    group_gradient<acc_t, kPerc, kTemporal>(n, K, p, q, e, c, bpos.perc_scale.data(), pos.has_prev.data(),
                                            pos.has_next.data(), g);
    if (has(term_mask, kLandmark))
      for (int64_t r = 0; r < nb * pb.T; ++r) {
        gram_times(K, gram, e + r * K, buf.aux);
        const acc_t two_landmark = acc_t(2) * c.landmark;
        acc_t* FL_R gr = g + r * K;
        for (int64_t k = 0; k < K; ++k) gr[k] += two_landmark * buf.aux[k];
      }
    if (gq) store(n, g, acc_t(-1), bpos.through_w.empty() ? nullptr : bpos.through_w.data(), gq + at);
    if (!gp && !graw) continue;
    if (has(term_mask, kSmoothing)) {
      const acc_t* FL_R raw = group_values<acc_t>(in, 2, g0, nb, 0, C, buf.values[2]);
      acc_t* FL_R sgn = buf.values[4];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        sgn[i] = c.smoothing * (acc_t(p[i] > raw[i]) - acc_t(p[i] < raw[i]));
        g[i] += sgn[i];
      }
      if (graw) store(n, sgn, acc_t(-1), static_cast<const acc_t*>(nullptr), graw + at);
    }
    if (!gp) continue;
    if (has(term_mask, kConsistency)) {
      const acc_t* FL_R prev = group_values<acc_t>(in, 3, g0, nb, 0, C, buf.values[3]);
      const acc_t two_cons = acc_t(2) * c.consistency;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) g[i] += two_cons * (p[i] - prev[i]);
    }
    if (!direct) store(n, g, acc_t(1), static_cast<const acc_t*>(nullptr), gp + at);
  }
}

// ----------------------------------------------------------------------------------------------
// Operators
// ----------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> empty_outputs(const Tensor& pred, const Problem& pb) {
  const auto options = pred.options().dtype(acc_type_of(pred.scalar_type()));
  int n = 0;
  for (int term = 0; term < kNumTerms; ++term) n += has(pb.term_mask, term);
  return {at::empty({n}, options), at::empty({}, options),
          at::empty({2, needs_col_stats(pb) ? pb.T * pb.K : 0}, options)};
}

struct Gradients {
  Tensor pred, target, raw;
};
Gradients empty_gradients(const Tensor& pred, std::array<bool, 3> mask, const Problem& pb) {
  const auto none = [&] { return at::empty({0}, pred.options()); };
  const bool raw = mask[2] && has(pb.term_mask, kSmoothing);
  return {mask[0] ? at::empty(pred.sizes(), pred.options()) : none(),
          mask[1] ? at::empty(pred.sizes(), pred.options()) : none(),
          raw ? at::empty(pred.sizes(), pred.options()) : none()};
}

void check_grads(const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& col_stats,
                 const Tensor& pred, const Problem& pb) {
  const auto acc = acc_type_of(pred.scalar_type());
  int n = 0;
  for (int term = 0; term < kNumTerms; ++term) n += has(pb.term_mask, term);
  TORCH_CHECK(!grad_terms || (grad_terms->dim() == 1 && grad_terms->size(0) == n && grad_terms->scalar_type() == acc &&
                              grad_terms->device() == pred.device()),
              "blendshape: grad_terms must be a [number of terms] tensor of the terms' dtype");
  TORCH_CHECK(!grad_total ||
                  (grad_total->dim() == 0 && grad_total->scalar_type() == acc && grad_total->device() == pred.device()),
              "blendshape: grad_total must be a 0-dim tensor of the terms' dtype");
  TORCH_CHECK(col_stats.dim() == 2 && col_stats.size(0) == 2 && col_stats.is_contiguous() &&
                  col_stats.size(1) == (needs_col_stats(pb) ? pb.T * pb.K : 0) && col_stats.scalar_type() == acc,
              "blendshape: col_stats must be the forward's [2, T*K] column statistics");
}

std::tuple<Tensor, Tensor, Tensor> blendshape_forward_cpu(const Tensor& pred, const Tensor& target,
                                                          const OptTensor& raw_pred, const OptTensor& prev_pred,
                                                          const Tensor& settings, const OptTensor& group_coef,
                                                          const OptTensor& landmark_gram, int64_t landmark_rows,
                                                          int64_t term_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, term_mask);
  auto [out_terms, total, col_stats] = empty_outputs(pred, pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "blendshape_forward_cpu", [&] {
    const auto in = make_inputs<scalar_t>(pred, target, raw_pred, prev_pred);
    forward_cpu<scalar_t>(in, pb, settings.const_data_ptr<double>(), group_coef, landmark_gram, out_terms, total,
                          col_stats);
  });
  return {out_terms, total, col_stats};
}

std::tuple<Tensor, Tensor, Tensor> blendshape_backward_cpu(
    const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& col_stats, const Tensor& pred,
    const Tensor& target, const OptTensor& raw_pred, const OptTensor& prev_pred, const Tensor& settings,
    const OptTensor& group_coef, const OptTensor& landmark_gram, int64_t landmark_rows, int64_t term_mask,
    std::array<bool, 3> output_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, term_mask);
  check_grads(grad_terms, grad_total, col_stats, pred, pb);
  Gradients grads = empty_gradients(pred, output_mask, pb);
  if (grads.pred.numel() + grads.target.numel() + grads.raw.numel() == 0) return {grads.pred, grads.target, grads.raw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "blendshape_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto in = make_inputs<scalar_t>(pred, target, raw_pred, prev_pred);
    const double* s = settings.const_data_ptr<double>();
    const acc_t* g = static_cast<const acc_t*>(data_or_null(grad_terms));
    const int64_t gs = stride_or_zero(grad_terms);
    const acc_t gT = value_or_zero<acc_t>(grad_total);
    const Coefficients<acc_t> c{grad_coefficient<acc_t>(pb, kMse, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kL1, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kPerceptual, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kTemporal, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kLandmark, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kSmoothing, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kConsistency, g, gs, gT, s)};
    const int64_t C = pb.T * pb.K, G = group_size(C);
    const Positions<acc_t> pos = positions<acc_t>(pb, group_coef, G);
    BackwardPositions<acc_t> bpos;
    const bool perc = has(pb.term_mask, kPerceptual);
    if (perc) {
      std::vector<acc_t> scale(C), through;
      if (pb.group_form) {
        for (int64_t i = 0; i < C; ++i) scale[i] = acc_t(2) * c.perc * pos.gcoef[i];
      } else {
        const acc_t* w_col = col_stats.const_data_ptr<acc_t>();
        through.resize(C);
        const acc_t inv_B = acc_t(1) / static_cast<acc_t>(pb.B);
        for (int64_t i = 0; i < C; ++i) {
          const acc_t w = w_col[i];
          scale[i] = acc_t(2) * c.perc * w * w;
          through[i] = acc_t(2) * c.perc * w * w_col[C + i] * inv_B;
        }
        bpos.through_w = tiled(through, G);
      }
      bpos.perc_scale = tiled(scale, G);
    }
    const std::vector<acc_t> G_mat = gram_of<acc_t>(landmark_gram, pb);
    scalar_t* gp = grads.pred.numel() ? grads.pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gq = grads.target.numel() ? grads.target.data_ptr<scalar_t>() : nullptr;
    scalar_t* graw = grads.raw.numel() ? grads.raw.data_ptr<scalar_t>() : nullptr;
    const bool temporal = has(pb.term_mask, kTemporal);
    at::parallel_for(0, pb.B, std::max<int64_t>(G, 32768 / std::max<int64_t>(1, C)), [&](int64_t b0, int64_t b1) {
      Buffers<acc_t> buf(G * C, pb.K);
      std::unique_ptr<acc_t[]> grad(new acc_t[G * C]);
      auto run = [&](auto kPerc, auto kTemporal) {
        backward_groups<scalar_t, acc_t, decltype(kPerc)::value, decltype(kTemporal)::value>(
            in, pb, c, pos, bpos, G_mat.data(), G, b0, b1, gp, gq, graw, buf, grad.get());
      };
      if (perc) {
        if (temporal) run(std::true_type{}, std::true_type{});
        else run(std::true_type{}, std::false_type{});
      } else {
        if (temporal) run(std::false_type{}, std::true_type{});
        else run(std::false_type{}, std::false_type{});
      }
    });
  });
  return {grads.pred, grads.target, grads.raw};
}

#ifdef WITH_CUDA
void check_cuda_size(const Problem& pb) {
  TORCH_CHECK(pb.K <= 2048, "blendshape: the CUDA kernels take at most 2048 blendshapes (K = ", pb.K,
              "); use backend='triton'");
}

CudaInputs cuda_inputs(const Tensor& pred, const Tensor& target, const OptTensor& raw, const OptTensor& prev,
                       const Tensor& settings, const OptTensor& group_coef, const OptTensor& gram, const Problem& pb) {
  CudaInputs in{};
  const Tensor* xs[4] = {&pred, &target, raw ? &*raw : nullptr, prev ? &*prev : nullptr};
  const void** ptrs[4] = {&in.pred, &in.target, &in.raw_pred, &in.prev_pred};
  for (int i = 0; i < 4; ++i) {
    if (!xs[i]) continue;
    *ptrs[i] = xs[i]->const_data_ptr();
    const auto s = strides3(*xs[i]);
    for (int j = 0; j < 3; ++j) in.strides[i][j] = s[j];
  }
  in.settings = settings.const_data_ptr<double>();
  in.group_coef = group_coef ? group_coef->const_data_ptr<double>() : nullptr;
  in.group_len = group_coef ? group_coef->numel() : 0;
  in.gram = has(pb.term_mask, kLandmark) ? gram->const_data_ptr<double>() : nullptr;
  in.problem = pb;
  in.dtype = cuda_dtype_of(pred.scalar_type());
  return in;
}

std::tuple<Tensor, Tensor, Tensor> blendshape_forward_cuda(const Tensor& pred, const Tensor& target,
                                                           const OptTensor& raw_pred, const OptTensor& prev_pred,
                                                           const Tensor& settings, const OptTensor& group_coef,
                                                           const OptTensor& landmark_gram, int64_t landmark_rows,
                                                           int64_t term_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, term_mask);
  check_cuda_size(pb);
  const c10::cuda::CUDAGuard guard(pred.device());
  auto [out_terms, total, col_stats] = empty_outputs(pred, pb);
  const CudaInputs in = cuda_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, pb);
  Tensor workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(in))}, pred.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t status = forward_cuda(in, out_terms.data_ptr(), total.data_ptr(), col_stats.data_ptr(),
                                          workspace.data_ptr(), arrival_counter(pred, stream).data_ptr(), stream);
  TORCH_CHECK(status == cudaSuccess, "blendshape_forward (CUDA) failed: ", cudaGetErrorString(status));
  return {out_terms, total, col_stats};
}

std::tuple<Tensor, Tensor, Tensor> blendshape_backward_cuda(
    const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& col_stats, const Tensor& pred,
    const Tensor& target, const OptTensor& raw_pred, const OptTensor& prev_pred, const Tensor& settings,
    const OptTensor& group_coef, const OptTensor& landmark_gram, int64_t landmark_rows, int64_t term_mask,
    std::array<bool, 3> output_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, term_mask);
  check_grads(grad_terms, grad_total, col_stats, pred, pb);
  check_cuda_size(pb);
  const c10::cuda::CUDAGuard guard(pred.device());
  Gradients grads = empty_gradients(pred, output_mask, pb);
  if (grads.pred.numel() + grads.target.numel() + grads.raw.numel() > 0) {
    const CudaInputs in = cuda_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, pb);
    const CudaGradients out{data_or_null(grad_terms), stride_or_zero(grad_terms), data_or_null(grad_total),
                            col_stats.const_data_ptr(),
                            grads.pred.numel() ? grads.pred.data_ptr() : nullptr,
                            grads.target.numel() ? grads.target.data_ptr() : nullptr,
                            grads.raw.numel() ? grads.raw.data_ptr() : nullptr};
    const cudaError_t status = backward_cuda(in, out, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "blendshape_backward (CUDA) failed: ", cudaGetErrorString(status));
  }
  return {grads.pred, grads.target, grads.raw};
}
#endif  // WITH_CUDA

// ---------------------------------------------------------------------------------------------
// Autograd (csrc/common/autograd.h): gradients of pred, target and raw_pred; prev_pred is a constant.
// ---------------------------------------------------------------------------------------------

struct BlendshapeFunction : public torch::autograd::Function<BlendshapeFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                               const OptTensor& raw_pred, const OptTensor& prev_pred, const Tensor& settings,
                               const OptTensor& group_coef, const OptTensor& landmark_gram, int64_t landmark_rows,
                               int64_t term_mask) {
    const at::AutoDispatchBelowADInplaceOrView below;
    auto [out_terms, total, col_stats] =
        FL_OPERATOR("blendshape_forward", decltype(blendshape_forward_cpu))
            .call(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows, term_mask);
    ctx->save_for_backward({col_stats, pred, target, saved_or_undefined(raw_pred), saved_or_undefined(prev_pred),
                            settings, saved_or_undefined(group_coef), saved_or_undefined(landmark_gram)});
    ctx->saved_data["landmark_rows"] = landmark_rows;
    ctx->saved_data["term_mask"] = term_mask;
    ctx->mark_non_differentiable({col_stats});
    ctx->set_materialize_grads(false);
    return {out_terms, total, col_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);  // one per forward argument
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    // Edges: pred 0, target 1, then raw_pred 2 when given.
    const bool has_raw = saved[3].defined();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_raw && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    auto [grad_pred, grad_target, grad_raw] = call_backward(
        FL_OPERATOR("blendshape_backward", decltype(blendshape_backward_cpu)), present(grads[0]), present(grads[1]),
        saved[0], saved[1], saved[2], present(saved[3]), present(saved[4]), saved[5], present(saved[6]),
        present(saved[7]), ctx->saved_data["landmark_rows"].toInt(), ctx->saved_data["term_mask"].toInt(), mask);
    if (mask[0]) out[0] = grad_pred;
    if (mask[1]) out[1] = grad_target;
    if (mask[2]) out[2] = grad_raw;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> blendshape_forward_autograd(const Tensor& pred, const Tensor& target,
                                                               const OptTensor& raw_pred, const OptTensor& prev_pred,
                                                               const Tensor& settings, const OptTensor& group_coef,
                                                               const OptTensor& landmark_gram, int64_t landmark_rows,
                                                               int64_t term_mask) {
  refuse_grad("blendshape_forward", "settings", settings);
  refuse_grad("blendshape_forward", "group_coef", group_coef);
  refuse_grad("blendshape_forward", "landmark_gram", landmark_gram);
  const variable_list out = BlendshapeFunction::apply(pred, target, raw_pred, prev_pred, settings, group_coef,
                                                      landmark_gram, landmark_rows, term_mask);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace blendshape
}  // namespace fusedloss

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def("blendshape_forward(Tensor pred, Tensor target, Tensor? raw_pred, Tensor? prev_pred, Tensor settings, "
        "Tensor? group_coef, Tensor? landmark_gram, int landmark_rows, int term_mask) -> (Tensor, Tensor, Tensor)");
  m.def("blendshape_backward(Tensor? grad_terms, Tensor? grad_total, Tensor col_stats, Tensor pred, Tensor target, "
        "Tensor? raw_pred, Tensor? prev_pred, Tensor settings, Tensor? group_coef, Tensor? landmark_gram, "
        "int landmark_rows, int term_mask, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("blendshape_forward", &fusedloss::blendshape::blendshape_forward_autograd);
  m.impl("blendshape_backward", torch::CppFunction::makeFromBoxedFunction<&fusedloss::no_double_backward>());
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("blendshape_forward", &fusedloss::blendshape::blendshape_forward_cpu);
  m.impl("blendshape_backward", &fusedloss::blendshape::blendshape_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("blendshape_forward", &fusedloss::blendshape::blendshape_forward_cuda);
  m.impl("blendshape_backward", &fusedloss::blendshape::blendshape_backward_cuda);
}
#endif
