// Blendshape loss: operator schemas, C++ CPU kernels, and the CUDA dispatch (cuda/blendshape.cu).
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
#include <type_traits>
#include <vector>

#include "blendshape_math.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/blendshape_cuda.h"
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
                     int64_t terms) {
  TORCH_CHECK(pred.dim() == 2 || pred.dim() == 3, "blendshape: pred must be [B, K] or [B, T, K]");
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "blendshape: pred must be floating point");
  TORCH_CHECK(terms >= 0 && terms < (1 << kNumTerms), "blendshape: bad term mask ", terms);
  check_like("target", target, pred);
  const int64_t K = pred.size(-1), T = pred.dim() == 3 ? pred.size(1) : 1;
  TORCH_CHECK(K >= 1 && T >= 1, "blendshape: pred must have at least one frame and one blendshape");
  TORCH_CHECK(settings.dim() == 1 && settings.size(0) == kNumSettings && settings.scalar_type() == at::kDouble &&
                  settings.is_contiguous() && settings.device() == pred.device(),
              "blendshape: settings must be a contiguous float64 [8] tensor on pred's device");
  if (has(terms, kSmoothing)) {
    TORCH_CHECK(raw.has_value(), "blendshape: raw_pred is required for the smoothing term");
    check_like("raw_pred", *raw, pred);
  }
  if (has(terms, kConsistency)) {
    TORCH_CHECK(prev.has_value(), "blendshape: prev_pred is required for the consistency term");
    check_like("prev_pred", *prev, pred);
  }
  TORCH_CHECK(!has(terms, kTemporal) || pred.dim() == 3, "blendshape: the temporal term needs [B, T, K] input");
  if (group_coef.has_value())
    TORCH_CHECK(group_coef->dim() == 1 && group_coef->scalar_type() == at::kDouble && group_coef->is_contiguous() &&
                    group_coef->device() == pred.device(),
                "blendshape: group_coef must be a contiguous float64 1-D tensor on pred's device");
  if (has(terms, kLandmark)) {
    TORCH_CHECK(gram.has_value() && gram->dim() == 2 && gram->size(0) == K && gram->size(1) == K &&
                    gram->scalar_type() == at::kDouble && gram->is_contiguous() && gram->device() == pred.device(),
                "blendshape: landmark_gram must be a contiguous float64 [K, K] tensor on pred's device");
    TORCH_CHECK(J >= 1, "blendshape: landmark_rows must be >= 1");
  }
  return Problem{pred.size(0), T, K, J, static_cast<int>(terms), group_coef.has_value()};
}

// Strides of x viewed as [B, T, K].
std::array<int64_t, 3> strides3(const Tensor& x) {
  if (x.dim() == 3) return {x.stride(0), x.stride(1), x.stride(2)};
  return {x.stride(0), 0, x.stride(1)};
}

bool needs_col_stats(const Problem& p) { return has(p.terms, kPerceptual) && !p.group_form; }

// ----------------------------------------------------------------------------------------------
// CPU kernels
// ----------------------------------------------------------------------------------------------

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FL_CPU_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define FL_CPU_CLONES
#endif
#define FL_R __restrict__

template <typename scalar_t>
struct Rows {
  const scalar_t* x[4];                   // pred, target, raw_pred, prev_pred (null when absent)
  std::array<int64_t, 3> s[4];
  int64_t K;
  // Row (b, t) of input i as acc_t: the input itself when it already is, else converted into buf.
  template <typename acc_t>
  const acc_t* row(int i, int64_t b, int64_t t, acc_t* buf) const {
    const scalar_t* r = x[i] + b * s[i][0] + t * s[i][1];
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (s[i][2] == 1) return r;
    }
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<acc_t>(r[k * s[i][2]]);
    return buf;
  }
};

template <typename scalar_t>
Rows<scalar_t> make_rows(const Tensor& pred, const Tensor& target, const OptTensor& raw, const OptTensor& prev) {
  Rows<scalar_t> r{};
  const Tensor* xs[4] = {&pred, &target, raw ? &*raw : nullptr, prev ? &*prev : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (!xs[i]) continue;
    r.x[i] = xs[i]->const_data_ptr<scalar_t>();
    r.s[i] = strides3(*xs[i]);
  }
  r.K = pred.size(-1);
  return r;
}

// Per-thread scratch rows of K values.
template <typename acc_t>
struct Scratch {
  explicit Scratch(int64_t K, int rows) : K(K), data(rows * K, acc_t(0)) {}
  acc_t* row(int i) { return data.data() + i * K; }
  int64_t K;
  std::vector<acc_t> data;
};

// group_coef padded with zeros to K columns, and the Gram matrix, in acc_t.
template <typename acc_t>
std::vector<acc_t> padded(const OptTensor& x, int64_t n) {
  std::vector<acc_t> out(n, acc_t(0));
  if (x) {
    const double* v = x->const_data_ptr<double>();
    for (int64_t i = 0; i < std::min<int64_t>(n, x->numel()); ++i) out[i] = static_cast<acc_t>(v[i]);
  }
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

// Row loops of the forward; every output array is distinct from the inputs.
template <typename acc_t>
inline void error_sums(int64_t K, const acc_t* FL_R p, const acc_t* FL_R q, acc_t thr, acc_t* FL_R e,
                       acc_t* FL_R sq, acc_t* FL_R ab, acc_t* FL_R act) {
  for (int64_t k = 0; k < K; ++k) {
    const acc_t x = p[k] - q[k];
    e[k] = x;
    sq[k] += x * x;
    ab[k] += std::abs(x);
    act[k] += acc_t((p[k] > thr) != (q[k] > thr));
  }
}

template <typename acc_t>
inline void weighted_square_sum(int64_t K, const acc_t* FL_R w, const acc_t* FL_R x, acc_t* FL_R sum) {
  for (int64_t k = 0; k < K; ++k) sum[k] += w[k] * x[k] * x[k];
}

template <typename acc_t>
inline void column_sums(int64_t K, const acc_t* FL_R q, const acc_t* FL_R e, acc_t* FL_R colT, acc_t* FL_R colS2) {
  for (int64_t k = 0; k < K; ++k) {
    colT[k] += q[k];
    colS2[k] += e[k] * e[k];
  }
}

template <typename acc_t>
inline void difference_square_sum(int64_t K, const acc_t* FL_R a, const acc_t* FL_R b, acc_t* FL_R sum) {
  for (int64_t k = 0; k < K; ++k) sum[k] += (a[k] - b[k]) * (a[k] - b[k]);
}

template <typename acc_t>
inline void difference_abs_sum(int64_t K, const acc_t* FL_R a, const acc_t* FL_R b, acc_t* FL_R sum) {
  for (int64_t k = 0; k < K; ++k) sum[k] += std::abs(a[k] - b[k]);
}

template <typename acc_t>
inline void product_sum(int64_t K, const acc_t* FL_R a, const acc_t* FL_R b, acc_t* FL_R sum) {
  for (int64_t k = 0; k < K; ++k) sum[k] += a[k] * b[k];
}

// Scratch rows of the forward.
enum ForwardRow : int { kP, kQ, kRaw, kPrev, kE0, kE1, kGe, kFirstSum, kForwardRows = kFirstSum + kNumSums };

// Sums of batch elements [b0, b1): per-column partial sums into sums_k (kNumSums rows of K) and
// the column statistics colT, colS2 (T*K each, default perceptual form).
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void forward_rows(const Rows<scalar_t>& r, const Problem& pb, acc_t thr, const acc_t* gcoef,
                                const acc_t* gram, int64_t b0, int64_t b1, acc_t* colT, acc_t* colS2,
                                Scratch<acc_t>& w) {
  const int64_t K = pb.K;
  const int terms = pb.terms;
  acc_t* sum[kNumSums];
  for (int s = 0; s < kNumSums; ++s) sum[s] = w.row(kFirstSum + s);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < pb.T; ++t) {
      acc_t* e = w.row(t % 2 ? kE1 : kE0);
      const acc_t* e_prev = w.row(t % 2 ? kE0 : kE1);
      const acc_t* p = r.row(0, b, t, w.row(kP));
      const acc_t* q = r.row(1, b, t, w.row(kQ));
      error_sums(K, p, q, thr, e, sum[kSqErr], sum[kAbsErr], sum[kActive]);
      if (has(terms, kPerceptual)) {
        if (pb.group_form) weighted_square_sum(K, gcoef, e, sum[kGroupSq]);
        else column_sums(K, q, e, colT + t * K, colS2 + t * K);
      }
      if (has(terms, kTemporal) && t >= 1) difference_square_sum(K, e, e_prev, sum[kTemporalSq]);
      if (has(terms, kLandmark)) {
        gram_times(K, gram, e, w.row(kGe));
        product_sum(K, e, w.row(kGe), sum[kLandmarkSq]);
      }
      if (has(terms, kSmoothing)) difference_abs_sum(K, p, r.row(2, b, t, w.row(kRaw)), sum[kSmoothAbs]);
      if (has(terms, kConsistency)) difference_square_sum(K, p, r.row(3, b, t, w.row(kPrev)), sum[kConsistencySq]);
    }
  }
}

// Fixed batch chunks (independent of the thread count) keep the sums deterministic.
int64_t batch_chunk(int64_t B) { return std::max<int64_t>(1, (B + 63) / 64); }

template <typename scalar_t>
void forward_cpu(const Rows<scalar_t>& r, const Problem& pb, const double* settings, const OptTensor& group_coef,
                 const OptTensor& gram, Tensor& terms, Tensor& total, Tensor& col_stats) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t K = pb.K, C = pb.T * K, chunk = batch_chunk(pb.B);
  const int64_t nchunks = std::max<int64_t>(1, (pb.B + chunk - 1) / chunk);
  const bool cols = needs_col_stats(pb);
  const acc_t thr = threshold_as<scalar_t, acc_t>(settings[kThreshold]);
  const std::vector<acc_t> gcoef = padded<acc_t>(group_coef, K);
  const std::vector<acc_t> G = padded<acc_t>(gram, has(pb.terms, kLandmark) ? K * K : 0);
  std::vector<double> sums(nchunks * kNumSums, 0.0);
  std::vector<acc_t> col_partial(cols ? nchunks * 2 * C : 0, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Scratch<acc_t> scratch(K, kForwardRows);
      acc_t* colT = cols ? col_partial.data() + c * 2 * C : nullptr;
      forward_rows<scalar_t, acc_t>(r, pb, thr, gcoef.data(), G.data(), c * chunk,
                                    std::min(pb.B, (c + 1) * chunk), colT, cols ? colT + C : nullptr, scratch);
      for (int s = 0; s < kNumSums; ++s) {
        const acc_t* row = scratch.row(kFirstSum + s);
        double v = 0;
        for (int64_t k = 0; k < K; ++k) v += row[k];
        sums[c * kNumSums + s] = v;
      }
    }
  });
  double total_sums[kNumSums] = {};
  for (int64_t c = 0; c < nchunks; ++c)
    for (int s = 0; s < kNumSums; ++s) total_sums[s] += sums[c * kNumSums + s];
  double weighted = 0;
  if (cols) {
    acc_t* w_out = col_stats.data_ptr<acc_t>();
    acc_t* s2_out = w_out + C;
    for (int64_t i = 0; i < C; ++i) {
      acc_t colT = 0, colS2 = 0;
      for (int64_t c = 0; c < nchunks; ++c) {
        colT += col_partial[c * 2 * C + i];
        colS2 += col_partial[c * 2 * C + C + i];
      }
      const acc_t w = pb.B > 0 ? colT / static_cast<acc_t>(pb.B) : acc_t(0);
      w_out[i] = w;
      s2_out[i] = colS2;
      weighted += double(w) * double(w) * double(colS2);
    }
  }
  acc_t* out = terms.data_ptr<acc_t>();
  double sum = 0;
  for (int term = 0; term < kNumTerms; ++term) {
    if (!has(pb.terms, term)) continue;
    const double value = term_value<double>(pb, term, total_sums, weighted);
    out[term_index(pb.terms, term)] = static_cast<acc_t>(value);
    sum += settings[term] * value;
  }
  *total.data_ptr<acc_t>() = static_cast<acc_t>(sum);
}

// Scratch rows of the backward.
enum BackwardRow : int { kBP, kBQ, kBRaw, kBPrev, kBEring, kBGe = kBEring + 3, kBGrad, kBackwardRows };

template <typename acc_t>
struct Coefficients {
  acc_t mse, l1, perc, temporal, landmark, smoothing, consistency;
};

// Gradients of batch elements [b0, b1); see blendshape_math.h for the formulas.
template <typename scalar_t, typename acc_t>
FL_CPU_CLONES void backward_rows(const Rows<scalar_t>& r, const Problem& pb, const Coefficients<acc_t> c,
                                 const acc_t* gcoef, const acc_t* gram, const acc_t* w_col, const acc_t* s2_col,
                                 int64_t b0, int64_t b1, scalar_t* gp, scalar_t* gq, scalar_t* graw,
                                 Scratch<acc_t>& sc) {
  const int64_t K = pb.K, T = pb.T;
  const int terms = pb.terms;
  const bool cols = needs_col_stats(pb);
  const acc_t inv_B = pb.B > 0 ? acc_t(1) / static_cast<acc_t>(pb.B) : acc_t(0);
  auto e_row = [&](int64_t t) { return sc.row(kBEring + t % 3); };
  auto load_e = [&](int64_t b, int64_t t) {
    const acc_t* p = r.row(0, b, t, sc.row(kBP));
    const acc_t* q = r.row(1, b, t, sc.row(kBQ));
    acc_t* FL_R e = e_row(t);
    for (int64_t k = 0; k < K; ++k) e[k] = p[k] - q[k];
  };
  acc_t* FL_R g = sc.row(kBGrad);
  for (int64_t b = b0; b < b1; ++b) {
    load_e(b, 0);
    for (int64_t t = 0; t < T; ++t) {
      if (t + 1 < T) load_e(b, t + 1);
      const acc_t* FL_R e = e_row(t);
      for (int64_t k = 0; k < K; ++k) g[k] = acc_t(2) * c.mse * e[k] + c.l1 * sign(e[k]);
      if (has(terms, kPerceptual)) {
        if (pb.group_form) {
          for (int64_t k = 0; k < K; ++k) g[k] += acc_t(2) * c.perc * gcoef[k] * e[k];
        } else {
          const acc_t* FL_R w = w_col + t * K;
          for (int64_t k = 0; k < K; ++k) g[k] += acc_t(2) * c.perc * w[k] * w[k] * e[k];
        }
      }
      if (has(terms, kTemporal)) {
        const acc_t* FL_R prev = t >= 1 ? e_row(t - 1) : e;  // e - e = 0 at the edges
        const acc_t* FL_R next = t + 1 < T ? e_row(t + 1) : e;
        for (int64_t k = 0; k < K; ++k) g[k] += acc_t(2) * c.temporal * ((e[k] - prev[k]) - (next[k] - e[k]));
      }
      if (has(terms, kLandmark)) {
        acc_t* FL_R ge = sc.row(kBGe);
        gram_times(K, gram, e, ge);
        for (int64_t k = 0; k < K; ++k) g[k] += acc_t(2) * c.landmark * ge[k];
      }
      const int64_t out = (b * T + t) * K;
      if (gq) {
        if (cols) {
          const acc_t* FL_R w = w_col + t * K;
          const acc_t* FL_R s2 = s2_col + t * K;
          for (int64_t k = 0; k < K; ++k)
            gq[out + k] = static_cast<scalar_t>(-g[k] + acc_t(2) * c.perc * w[k] * s2[k] * inv_B);
        } else {
          for (int64_t k = 0; k < K; ++k) gq[out + k] = static_cast<scalar_t>(-g[k]);
        }
      }
      if (!gp && !graw) continue;
      const acc_t* p = r.row(0, b, t, sc.row(kBP));
      if (has(terms, kSmoothing)) {
        const acc_t* FL_R raw = r.row(2, b, t, sc.row(kBRaw));
        for (int64_t k = 0; k < K; ++k) {
          const acc_t s = c.smoothing * sign(p[k] - raw[k]);
          g[k] += s;
          if (graw) graw[out + k] = static_cast<scalar_t>(-s);
        }
      }
      if (!gp) continue;
      if (has(terms, kConsistency)) {
        const acc_t* FL_R prev = r.row(3, b, t, sc.row(kBPrev));
        for (int64_t k = 0; k < K; ++k) g[k] += acc_t(2) * c.consistency * (p[k] - prev[k]);
      }
      for (int64_t k = 0; k < K; ++k) gp[out + k] = static_cast<scalar_t>(g[k]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Operators
// ----------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> empty_outputs(const Tensor& pred, const Problem& pb) {
  const auto options = pred.options().dtype(acc_type_of(pred.scalar_type()));
  int n = 0;
  for (int term = 0; term < kNumTerms; ++term) n += has(pb.terms, term);
  return {at::empty({n}, options), at::empty({}, options),
          at::empty({2, needs_col_stats(pb) ? pb.T * pb.K : 0}, options)};
}

struct Gradients {
  Tensor pred, target, raw;
};
Gradients empty_gradients(const Tensor& pred, std::array<bool, 3> mask, const Problem& pb) {
  const auto none = [&] { return at::empty({0}, pred.options()); };
  const bool raw = mask[2] && has(pb.terms, kSmoothing);
  return {mask[0] ? at::empty(pred.sizes(), pred.options()) : none(),
          mask[1] ? at::empty(pred.sizes(), pred.options()) : none(),
          raw ? at::empty(pred.sizes(), pred.options()) : none()};
}

void check_grads(const Tensor& grad_terms, const Tensor& grad_total, const Tensor& col_stats, const Tensor& pred,
                 const Problem& pb) {
  const auto acc = acc_type_of(pred.scalar_type());
  int n = 0;
  for (int term = 0; term < kNumTerms; ++term) n += has(pb.terms, term);
  TORCH_CHECK(grad_terms.dim() == 1 && grad_terms.size(0) == n && grad_terms.scalar_type() == acc &&
                  grad_terms.device() == pred.device(),
              "blendshape: grad_terms must be a [number of terms] tensor of the terms' dtype");
  TORCH_CHECK(grad_total.dim() == 0 && grad_total.scalar_type() == acc && grad_total.device() == pred.device(),
              "blendshape: grad_total must be a 0-dim tensor of the terms' dtype");
  TORCH_CHECK(col_stats.dim() == 2 && col_stats.size(0) == 2 && col_stats.is_contiguous() &&
                  col_stats.size(1) == (needs_col_stats(pb) ? pb.T * pb.K : 0) && col_stats.scalar_type() == acc,
              "blendshape: col_stats must be the forward's [2, T*K] column statistics");
}

std::tuple<Tensor, Tensor, Tensor> blendshape_forward_cpu(const Tensor& pred, const Tensor& target,
                                                          const OptTensor& raw_pred, const OptTensor& prev_pred,
                                                          const Tensor& settings, const OptTensor& group_coef,
                                                          const OptTensor& landmark_gram, int64_t landmark_rows,
                                                          int64_t terms) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, terms);
  auto [out_terms, total, col_stats] = empty_outputs(pred, pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "blendshape_forward_cpu", [&] {
    const auto rows = make_rows<scalar_t>(pred, target, raw_pred, prev_pred);
    forward_cpu<scalar_t>(rows, pb, settings.const_data_ptr<double>(), group_coef, landmark_gram, out_terms, total,
                          col_stats);
  });
  return {out_terms, total, col_stats};
}

std::tuple<Tensor, Tensor, Tensor> blendshape_backward_cpu(
    const Tensor& grad_terms, const Tensor& grad_total, const Tensor& col_stats, const Tensor& pred,
    const Tensor& target, const OptTensor& raw_pred, const OptTensor& prev_pred, const Tensor& settings,
    const OptTensor& group_coef, const OptTensor& landmark_gram, int64_t landmark_rows, int64_t terms,
    std::array<bool, 3> output_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, terms);
  check_grads(grad_terms, grad_total, col_stats, pred, pb);
  Gradients grads = empty_gradients(pred, output_mask, pb);
  if (grads.pred.numel() + grads.target.numel() + grads.raw.numel() == 0) return {grads.pred, grads.target, grads.raw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "blendshape_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = make_rows<scalar_t>(pred, target, raw_pred, prev_pred);
    const double* s = settings.const_data_ptr<double>();
    const acc_t* g = grad_terms.const_data_ptr<acc_t>();
    const int64_t gs = grad_terms.stride(0);
    const acc_t gT = *grad_total.const_data_ptr<acc_t>();
    const Coefficients<acc_t> c{grad_coefficient<acc_t>(pb, kMse, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kL1, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kPerceptual, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kTemporal, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kLandmark, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kSmoothing, g, gs, gT, s),
                                grad_coefficient<acc_t>(pb, kConsistency, g, gs, gT, s)};
    const std::vector<acc_t> gcoef = padded<acc_t>(group_coef, pb.K);
    const std::vector<acc_t> G = padded<acc_t>(landmark_gram, has(pb.terms, kLandmark) ? pb.K * pb.K : 0);
    const acc_t* w_col = col_stats.numel() ? col_stats.const_data_ptr<acc_t>() : nullptr;
    const acc_t* s2_col = w_col ? w_col + pb.T * pb.K : nullptr;
    scalar_t* gp = grads.pred.numel() ? grads.pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gq = grads.target.numel() ? grads.target.data_ptr<scalar_t>() : nullptr;
    scalar_t* graw = grads.raw.numel() ? grads.raw.data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, pb.T * pb.K));
    at::parallel_for(0, pb.B, grain, [&](int64_t b0, int64_t b1) {
      Scratch<acc_t> scratch(pb.K, kBackwardRows);
      backward_rows<scalar_t, acc_t>(rows, pb, c, gcoef.data(), G.data(), w_col, s2_col, b0, b1, gp, gq, graw,
                                     scratch);
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
  in.gram = has(pb.terms, kLandmark) ? gram->const_data_ptr<double>() : nullptr;
  in.problem = pb;
  switch (pred.scalar_type()) {
    case at::kFloat: in.dtype = DType::kFloat32; break;
    case at::kDouble: in.dtype = DType::kFloat64; break;
    case at::kHalf: in.dtype = DType::kFloat16; break;
    case at::kBFloat16: in.dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "blendshape: unsupported dtype ", pred.scalar_type());
  }
  return in;
}

std::tuple<Tensor, Tensor, Tensor> blendshape_forward_cuda(const Tensor& pred, const Tensor& target,
                                                           const OptTensor& raw_pred, const OptTensor& prev_pred,
                                                           const Tensor& settings, const OptTensor& group_coef,
                                                           const OptTensor& landmark_gram, int64_t landmark_rows,
                                                           int64_t terms) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, terms);
  check_cuda_size(pb);
  const c10::cuda::CUDAGuard guard(pred.device());
  auto [out_terms, total, col_stats] = empty_outputs(pred, pb);
  const CudaInputs in = cuda_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, pb);
  Tensor workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(in))}, pred.options().dtype(at::kByte));
  const cudaError_t status = forward_cuda(in, out_terms.data_ptr(), total.data_ptr(), col_stats.data_ptr(),
                                          workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "blendshape_forward (CUDA) failed: ", cudaGetErrorString(status));
  return {out_terms, total, col_stats};
}

std::tuple<Tensor, Tensor, Tensor> blendshape_backward_cuda(
    const Tensor& grad_terms, const Tensor& grad_total, const Tensor& col_stats, const Tensor& pred,
    const Tensor& target, const OptTensor& raw_pred, const OptTensor& prev_pred, const Tensor& settings,
    const OptTensor& group_coef, const OptTensor& landmark_gram, int64_t landmark_rows, int64_t terms,
    std::array<bool, 3> output_mask) {
  const Problem pb = check_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                  landmark_rows, terms);
  check_grads(grad_terms, grad_total, col_stats, pred, pb);
  check_cuda_size(pb);
  const c10::cuda::CUDAGuard guard(pred.device());
  Gradients grads = empty_gradients(pred, output_mask, pb);
  if (grads.pred.numel() + grads.target.numel() + grads.raw.numel() > 0) {
    const CudaInputs in = cuda_inputs(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, pb);
    const CudaGradients out{grad_terms.const_data_ptr(), grad_terms.stride(0), grad_total.const_data_ptr(),
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

}  // namespace
}  // namespace blendshape
}  // namespace fusedloss

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def("blendshape_forward(Tensor pred, Tensor target, Tensor? raw_pred, Tensor? prev_pred, Tensor settings, "
        "Tensor? group_coef, Tensor? landmark_gram, int landmark_rows, int terms) -> (Tensor, Tensor, Tensor)");
  m.def("blendshape_backward(Tensor grad_terms, Tensor grad_total, Tensor col_stats, Tensor pred, Tensor target, "
        "Tensor? raw_pred, Tensor? prev_pred, Tensor settings, Tensor? group_coef, Tensor? landmark_gram, "
        "int landmark_rows, int terms, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
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
