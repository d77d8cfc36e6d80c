// Score loss (TIGAS): operator schemas, C++ CPU kernels, and the CUDA dispatch (score_cuda.cu).
//
// fusedloss::score_forward  returns the three terms (regression, classification, ranking; 0 where
//                           not computed), their weighted total, the signed active-pair count of
//                           every score, the ranking's gradient scale (1 / (|R| |F|) for "mean",
//                           1 for "sum") and a status of non-finite values (score_math.h's Status).
// fusedloss::score_backward writes the gradients of scores and logits in one pass.
// The math is described once, in score_math.h. On the CPU the pair counts come from sorting each
// class (radix sort of order-preserving keys) and two linear merges; the terms from one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <type_traits>
#include <vector>

#include "../common/autograd.h"
#include "../common/macros.h"
#include "score_math.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/arrival_counter.h"
#include "../common/cuda_dtype_of.h"
#include "score_cuda.h"
#endif

namespace fusedloss {
namespace score {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Problem check_inputs(const Tensor& scores, const OptTensor& logits, const Tensor& labels, const Tensor& settings,
                     int64_t term_mask, bool smooth_l1, bool ranking_sum) {
  // [B] or [B, 1]: read along dim 0 (the gradient has the input's shape).
  TORCH_CHECK(scores.dim() == 1 || (scores.dim() == 2 && scores.size(1) == 1), "score: scores must be [B] or [B, 1]");
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "score: scores must be floating point");
  const int64_t B = scores.size(0);
  TORCH_CHECK(B < (int64_t(1) << 31), "score: at most 2^31 - 1 scores");
  TORCH_CHECK(term_mask >= 0 && term_mask < (1 << kNumTerms), "score: bad term mask ", term_mask);
  TORCH_CHECK((labels.dim() == 1 || (labels.dim() == 2 && labels.size(1) == 1)) && labels.size(0) == B && at::isFloatingType(labels.scalar_type()) &&
                  labels.device() == scores.device(),
              "score: labels must be a floating-point [B] or [B, 1] tensor on scores' device");
  if (has(term_mask, kClassification)) {
    TORCH_CHECK(logits.has_value(), "score: logits are required for the classification term");
    TORCH_CHECK(logits->dim() == 2 && logits->size(0) == B && logits->size(1) == 2 &&
                    logits->scalar_type() == scores.scalar_type() && logits->device() == scores.device(),
                "score: logits must be [B, 2] with scores' dtype and device");
  }
  TORCH_CHECK(settings.dim() == 1 && settings.size(0) == kNumSettings && settings.scalar_type() == at::kDouble &&
                  settings.is_contiguous() && settings.device() == scores.device(),
              "score: settings must be a contiguous float64 [4] tensor on scores' device");
  return Problem{B, static_cast<int>(term_mask), smooth_l1, ranking_sum};
}

// Labels are read in scores' dtype, in the arithmetic type, or in float64; any other dtype (16-bit
// labels with other scores) is converted to the arithmetic type, exactly. The class test
// label > 0.5 reads the label as given (a float64 label just above 0.5 may round to 0.5 in float32).
Tensor labels_as_read(const Tensor& labels, const Tensor& scores) {
  const auto t = labels.scalar_type();
  if (t == scores.scalar_type() || t == acc_type_of(scores.scalar_type()) || t == at::kDouble) return labels;
  return labels.to(acc_type_of(scores.scalar_type()));
}

// f(label_t{}) for the dtype labels_as_read left the labels in.
template <typename scalar_t, typename acc_t, typename F>
void dispatch_labels(const Tensor& labels, F&& f) {
  if (labels.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) f(scalar_t{});
  else if (labels.scalar_type() == at::kDouble) f(double{});
  else f(acc_t{});
}

// ----------------------------------------------------------------------------------------------
// CPU kernels
// ----------------------------------------------------------------------------------------------

// Fixed chunks of the element loops: partial sums per chunk, added in chunk order, so the result
// does not depend on the number of threads.
constexpr int64_t kChunk = 4096;
template <typename scalar_t, typename label_t>
struct Inputs {
  const scalar_t* scores;
  int64_t ss;
  const label_t* labels;
  int64_t ys;
  const scalar_t* logits;  // null without classification
  int64_t ls0, ls1;
};

// Sorting on the CPU: each score becomes an Item (an order-preserving unsigned key of its value,
// and its position), sorted by key: std::sort for short arrays, else an LSD radix sort (16-bit
// digits). Unsigned keys order every value, NaN included (std::sort on NaN floats would be undefined).
template <typename acc_t>
struct Item {
  using Key = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  Key key;
  uint32_t index;
};

// Order-preserving key of a float: flip every bit of a negative value, the sign bit of the others.
template <typename acc_t>
typename Item<acc_t>::Key key_of(acc_t x) {
  using Key = typename Item<acc_t>::Key;
  Key bits;
  std::memcpy(&bits, &x, sizeof bits);
  constexpr Key sign = Key(1) << (sizeof(Key) * 8 - 1);
  return bits & sign ? ~bits : bits | sign;
}

template <typename acc_t>
acc_t value_of(typename Item<acc_t>::Key key) {
  using Key = typename Item<acc_t>::Key;
  constexpr Key sign = Key(1) << (sizeof(Key) * 8 - 1);
  const Key bits = key & sign ? key & ~sign : ~key;
  acc_t x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

template <typename acc_t>
void sort_items(std::vector<Item<acc_t>>& items) {
  constexpr size_t kRadixMin = 1 << 15;
  if (items.size() < kRadixMin) {
    std::sort(items.begin(), items.end(), [](const Item<acc_t>& a, const Item<acc_t>& b) { return a.key < b.key; });
    return;
  }
  std::vector<Item<acc_t>> buffer(items.size());
  std::vector<uint32_t> offsets(1 << 16);
  for (size_t shift = 0; shift < sizeof(typename Item<acc_t>::Key) * 8; shift += 16) {
    std::fill(offsets.begin(), offsets.end(), 0u);
    for (const auto& item : items) ++offsets[(item.key >> shift) & 0xFFFF];
    if (offsets[(items[0].key >> shift) & 0xFFFF] == items.size()) continue;  // one digit: nothing to move
    uint32_t sum = 0;
    for (auto& o : offsets) sum += std::exchange(o, sum);
    for (const auto& item : items) buffer[offsets[(item.key >> shift) & 0xFFFF]++] = item;
    items.swap(buffer);
  }
}

// Every score's signed active-pair count (-n real, +n fake) from the two classes sorted: along
// ascending real scores the first active fake only moves right, and along ascending fake scores
// the first inactive real only moves right (active() is monotone), so two linear merges count all.
// Returns the number of real scores.
template <typename acc_t, typename scalar_t, typename label_t>
int64_t count_by_merge(const Inputs<scalar_t, label_t>& in, const Problem& pb, acc_t margin, int32_t* counts) {
  std::vector<Item<acc_t>> reals, fakes;
  reals.reserve(pb.B);
  fakes.reserve(pb.B);
  for (int64_t k = 0; k < pb.B; ++k) {
    const Item<acc_t> item{key_of(static_cast<acc_t>(in.scores[k * in.ss])), static_cast<uint32_t>(k)};
    (is_real(static_cast<double>(in.labels[k * in.ys])) ? reals : fakes).push_back(item);
  }
  const int64_t grain = pb.B < kChunk ? 2 : 1;  // (below kChunk scores an OpenMP region costs more than the work)
  at::parallel_for(0, 2, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) sort_items(i == 0 ? reals : fakes);
  });
  const int64_t nR = static_cast<int64_t>(reals.size()), nF = static_cast<int64_t>(fakes.size());
  at::parallel_for(0, 2, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t p = 0;
      if (i == 0) {
        for (const auto& r : reals) {
          const acc_t s = value_of<acc_t>(r.key);
          while (p < nF && !active(margin, s, value_of<acc_t>(fakes[p].key))) ++p;
          counts[r.index] = static_cast<int32_t>(-(nF - p));
        }
      } else {
        for (const auto& f : fakes) {
          const acc_t s = value_of<acc_t>(f.key);
          while (p < nR && active(margin, value_of<acc_t>(reals[p].key), s)) ++p;
          counts[f.index] = static_cast<int32_t>(p);
        }
      }
    }
  });
  return nR;
}

// Per-chunk sums of the forward.
struct Partial {
  double regression = 0, classification = 0, ranking = 0;
  int64_t bad_scores = 0, bad_logits = 0;
};

template <typename scalar_t, typename label_t>
void forward_cpu(const Inputs<scalar_t, label_t>& in, const Problem& pb, const double* settings, Tensor& terms,
                 Tensor& total, Tensor& counts, Tensor& rank_scale, Tensor& status) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const bool rank = has(pb.term_mask, kRanking), cls = has(pb.term_mask, kClassification);
  const acc_t margin = static_cast<acc_t>(settings[kMargin]);
  int32_t* count_out = rank ? counts.data_ptr<int32_t>() : nullptr;
  // Counting each score's pairs by scanning the other class (no sort) was measured no faster, even
  // at B = 64, than sorting and merging: the CPU always merges.
  int64_t reals = 0;
  if (rank) reals = count_by_merge(in, pb, margin, count_out);
  else for (int64_t k = 0; k < pb.B; ++k) reals += is_real(static_cast<double>(in.labels[k * in.ys]));
  const int64_t chunks = (pb.B + kChunk - 1) / kChunk;
  std::vector<Partial> partials(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      Partial p;
      acc_t reg = 0, ce = 0;
      for (int64_t k = chunk * kChunk; k < std::min(pb.B, (chunk + 1) * kChunk); ++k) {
        const acc_t s = static_cast<acc_t>(in.scores[k * in.ss]);
        const acc_t y = static_cast<acc_t>(in.labels[k * in.ys]);
        const bool real = is_real(static_cast<double>(in.labels[k * in.ys]));
        p.bad_scores += !std::isfinite(s);
        reg += regression_value(s - y, pb.smooth_l1);
        if (cls) {
          const acc_t l0 = static_cast<acc_t>(in.logits[k * in.ls0]);
          const acc_t l1 = static_cast<acc_t>(in.logits[k * in.ls0 + in.ls1]);
          p.bad_logits += !(std::isfinite(l0) && std::isfinite(l1));
          ce += cross_entropy(l0, l1, real);
        }
        if (rank) {
          const int64_t signed_count = count_out[k];
          p.ranking += ranking_share(signed_count, static_cast<double>(margin), static_cast<double>(s));
        }
      }
      p.regression = reg;
      p.classification = ce;
      partials[chunk] = p;
    }
  });
  Partial sum;
  for (const Partial& p : partials) {
    sum.regression += p.regression;
    sum.classification += p.classification;
    sum.ranking += p.ranking;
    sum.bad_scores += p.bad_scores;
    sum.bad_logits += p.bad_logits;
  }
  const double pairs = static_cast<double>(reals) * static_cast<double>(pb.B - reals);
  const double scale = pb.ranking_sum ? 1.0 : (pairs > 0 ? 1.0 / pairs : 0.0);
  const double inv_B = pb.B > 0 ? 1.0 / static_cast<double>(pb.B) : 0.0;
  acc_t values[kNumTerms] = {has(pb.term_mask, kRegression) ? static_cast<acc_t>(sum.regression * inv_B) : acc_t(0),
                             cls ? static_cast<acc_t>(sum.classification * inv_B) : acc_t(0),
                             rank ? static_cast<acc_t>(sum.ranking * scale) : acc_t(0)};
  acc_t weighted = 0;
  for (int t = 0; t < kNumTerms; ++t)
    if (has(pb.term_mask, t)) weighted += static_cast<acc_t>(settings[t]) * values[t];
  std::copy(values, values + kNumTerms, terms.data_ptr<acc_t>());
  *total.data_ptr<acc_t>() = weighted;
  *rank_scale.data_ptr<double>() = scale;
  *status.data_ptr<int32_t>() = (sum.bad_scores ? kScoresNotFinite : 0) | (sum.bad_logits ? kLogitsNotFinite : 0) |
                                (std::isfinite(weighted) ? 0 : kTotalNotFinite);
}

// d/dscores[k] = c_reg regression'(s_k - y_k) + c_rank count_k (count: null without ranking).
template <typename scalar_t, typename label_t, typename acc_t>
struct Gradients {
  const scalar_t* scores;
  int64_t ss;
  const label_t* labels;
  int64_t ys;
  const int32_t* count;
  acc_t c_reg, c_rank;
  scalar_t* out;
};

template <bool kSmoothL1, bool kCount, bool kUnitStride, typename scalar_t, typename label_t, typename acc_t>
FL_CPU_CLONES void score_gradient_loop(const Gradients<scalar_t, label_t, acc_t>& in, int64_t k0, int64_t k1) {
  const int64_t ss = kUnitStride ? 1 : in.ss, ys = kUnitStride ? 1 : in.ys;
  const scalar_t* FL_R s = in.scores;
  const label_t* FL_R y = in.labels;
  const int32_t* FL_R count = in.count;
  scalar_t* FL_R out = in.out;
  for (int64_t k = k0; k < k1; ++k) {
    acc_t g = in.c_reg * regression_grad(static_cast<acc_t>(s[k * ss]) - static_cast<acc_t>(y[k * ys]), kSmoothL1);
    if constexpr (kCount) g += in.c_rank * static_cast<acc_t>(count[k]);
    out[k] = static_cast<scalar_t>(g);
  }
}

// The loop over [k0, k1), vectorised where scores and labels both have the accumulation type acc_t
// (float32 or float64 inputs) and unit stride.
template <bool kSmoothL1, typename scalar_t, typename label_t, typename acc_t>
void score_gradients(const Gradients<scalar_t, label_t, acc_t>& in, int64_t k0, int64_t k1) {
  constexpr bool kPlain = std::is_same_v<scalar_t, acc_t> && std::is_same_v<label_t, acc_t>;
  if (kPlain && in.ss == 1 && in.ys == 1) {
    if (in.count) score_gradient_loop<kSmoothL1, true, true>(in, k0, k1);
    else score_gradient_loop<kSmoothL1, false, true>(in, k0, k1);
  } else {
    if (in.count) score_gradient_loop<kSmoothL1, true, false>(in, k0, k1);
    else score_gradient_loop<kSmoothL1, false, false>(in, k0, k1);
  }
}

struct Outputs {
  Tensor terms, total, counts, rank_scale, status;
};

Outputs empty_outputs(const Tensor& scores, const Problem& pb) {
  const auto options = scores.options();
  const auto acc = options.dtype(acc_type_of(scores.scalar_type()));
  return {at::empty({kNumTerms}, acc), at::empty({}, acc),
          at::empty({has(pb.term_mask, kRanking) ? pb.B : 0}, options.dtype(at::kInt)),
          at::empty({}, options.dtype(at::kDouble)), at::empty({}, options.dtype(at::kInt))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> score_forward_cpu(const Tensor& scores, const OptTensor& logits,
                                                                      const Tensor& labels_in, const Tensor& settings,
                                                                      int64_t term_mask, bool smooth_l1, bool ranking_sum) {
  const Problem pb = check_inputs(scores, logits, labels_in, settings, term_mask, smooth_l1, ranking_sum);
  const Tensor labels = labels_as_read(labels_in, scores);
  Outputs out = empty_outputs(scores, pb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "score_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool cls = has(pb.term_mask, kClassification);
    const scalar_t* l = cls ? logits->const_data_ptr<scalar_t>() : nullptr;
    const int64_t ls0 = cls ? logits->stride(0) : 0, ls1 = cls ? logits->stride(1) : 0;
    auto run = [&](auto label) {
      using label_t = decltype(label);
      const Inputs<scalar_t, label_t> in{scores.const_data_ptr<scalar_t>(), scores.stride(0),
                                         labels.const_data_ptr<label_t>(), labels.stride(0), l, ls0, ls1};
      forward_cpu<scalar_t, label_t>(in, pb, settings.const_data_ptr<double>(), out.terms, out.total, out.counts,
                                     out.rank_scale, out.status);
    };
    dispatch_labels<scalar_t, acc_t>(labels, run);
  });
  return {out.terms, out.total, out.counts, out.rank_scale, out.status};
}

void check_grads(const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& counts,
                 const Tensor& rank_scale, const Tensor& scores, const Problem& pb) {
  const auto acc = acc_type_of(scores.scalar_type());
  TORCH_CHECK(!grad_terms || (grad_terms->dim() == 1 && grad_terms->size(0) == kNumTerms &&
                              grad_terms->scalar_type() == acc && grad_terms->device() == scores.device()),
              "score: grad_terms must be a [3] tensor of the terms' dtype");
  TORCH_CHECK(!grad_total ||
                  (grad_total->dim() == 0 && grad_total->scalar_type() == acc && grad_total->device() == scores.device()),
              "score: grad_total must be a 0-dim tensor of the terms' dtype");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == (has(pb.term_mask, kRanking) ? pb.B : 0) &&
                  counts.scalar_type() == at::kInt && counts.is_contiguous() && counts.device() == scores.device(),
              "score: counts must be the forward's int32 [B] active-pair counts");
  TORCH_CHECK(rank_scale.dim() == 0 && rank_scale.scalar_type() == at::kDouble &&
                  rank_scale.device() == scores.device(),
              "score: rank_scale must be the forward's float64 [] scale");
}

std::tuple<Tensor, Tensor> empty_gradients(const Tensor& scores, const OptTensor& logits, const Problem& pb,
                                           std::array<bool, 2> mask) {
  const bool cls = mask[1] && has(pb.term_mask, kClassification);
  return {mask[0] ? at::empty(scores.sizes(), scores.options()) : at::empty({0}, scores.options()),
          cls ? at::empty({pb.B, 2}, logits->options()) : at::empty({0}, scores.options())};
}

std::tuple<Tensor, Tensor> score_backward_cpu(const OptTensor& grad_terms, const OptTensor& grad_total,
                                              const Tensor& counts, const Tensor& rank_scale, const Tensor& scores,
                                              const OptTensor& logits, const Tensor& labels_in,
                                              const Tensor& settings, int64_t term_mask, bool smooth_l1,
                                              bool ranking_sum, std::array<bool, 2> output_mask) {
  const Problem pb = check_inputs(scores, logits, labels_in, settings, term_mask, smooth_l1, ranking_sum);
  check_grads(grad_terms, grad_total, counts, rank_scale, scores, pb);
  const Tensor labels = labels_as_read(labels_in, scores);
  auto [grad_scores, grad_logits] = empty_gradients(scores, logits, pb, output_mask);
  if (grad_scores.numel() + grad_logits.numel() == 0) return {grad_scores, grad_logits};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "score_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // d(loss)/d(term t) = grad_terms[t] + weight_t grad_total, divided by the term's count.
    const double* w = settings.const_data_ptr<double>();
    // A missing gradient reads as 0.
    const acc_t* gt = static_cast<const acc_t*>(data_or_null(grad_terms));
    const int64_t g_stride = stride_or_zero(grad_terms);
    const acc_t g_total = value_or_zero<acc_t>(grad_total);
    auto coef = [&](int t) { return (gt != nullptr ? gt[t * g_stride] : acc_t(0)) + static_cast<acc_t>(w[t]) * g_total; };
    const acc_t inv_B = acc_t(1) / static_cast<acc_t>(pb.B);
    const acc_t c_reg = has(pb.term_mask, kRegression) ? coef(kRegression) * inv_B : acc_t(0);
    const acc_t c_cls = coef(kClassification) * inv_B;
    const acc_t c_rank = has(pb.term_mask, kRanking)
                             ? static_cast<acc_t>(static_cast<double>(coef(kRanking)) * *rank_scale.const_data_ptr<double>())
                             : acc_t(0);
    const int32_t* count = has(pb.term_mask, kRanking) ? counts.const_data_ptr<int32_t>() : nullptr;
    scalar_t* gs = grad_scores.numel() ? grad_scores.data_ptr<scalar_t>() : nullptr;
    scalar_t* gl = grad_logits.numel() ? grad_logits.data_ptr<scalar_t>() : nullptr;
    const scalar_t* s_ptr = scores.const_data_ptr<scalar_t>();
    const scalar_t* l_ptr = gl ? logits->const_data_ptr<scalar_t>() : nullptr;
    const int64_t ss = scores.stride(0), ls0 = gl ? logits->stride(0) : 0, ls1 = gl ? logits->stride(1) : 0;
    auto run = [&](auto label) {
      using label_t = decltype(label);
      const label_t* y_ptr = labels.const_data_ptr<label_t>();
      const int64_t ys = labels.stride(0);
      at::parallel_for(0, pb.B, kChunk, [&](int64_t k0, int64_t k1) {
        if (gs) {
          const Gradients<scalar_t, label_t, acc_t> in{s_ptr, ss, y_ptr, ys, count, c_reg, c_rank, gs};
          if (pb.smooth_l1) score_gradients<true>(in, k0, k1);
          else score_gradients<false>(in, k0, k1);
        }
        if (!gl) return;
        for (int64_t k = k0; k < k1; ++k) {
          // d CE / d l[other] = sigmoid(l[other] - l[class]) = -d CE / d l[class].
          const bool real = is_real(static_cast<double>(y_ptr[k * ys]));
          const acc_t l0 = static_cast<acc_t>(l_ptr[k * ls0]), l1 = static_cast<acc_t>(l_ptr[k * ls0 + ls1]);
          const acc_t p_other = sigmoid(logit_gap(l0, l1, real));
          const acc_t g_other = c_cls * p_other;
          gl[2 * k] = static_cast<scalar_t>(real ? g_other : -g_other);
          gl[2 * k + 1] = static_cast<scalar_t>(real ? -g_other : g_other);
        }
      });
    };
    dispatch_labels<scalar_t, acc_t>(labels, run);
  });
  return {grad_scores, grad_logits};
}

#ifdef WITH_CUDA
CudaInputs cuda_inputs(const Tensor& scores, const OptTensor& logits, const Tensor& labels, const Tensor& settings,
                       const Problem& pb) {
  CudaInputs in{};
  in.scores = scores.const_data_ptr();
  in.scores_stride = scores.stride(0);
  in.labels = labels.const_data_ptr();
  in.labels_stride = labels.stride(0);
  in.labels_dtype = cuda_dtype_of(labels.scalar_type());
  TORCH_CHECK(labels.scalar_type() == scores.scalar_type() || labels.scalar_type() == acc_type_of(scores.scalar_type()) ||
                  labels.scalar_type() == at::kDouble,
              "score: labels must be read in scores' dtype, the arithmetic type or float64 (labels_as_read)");
  const bool cls = has(pb.term_mask, kClassification);
  in.logits = cls ? logits->const_data_ptr() : nullptr;
  in.logits_strides[0] = cls ? logits->stride(0) : 0;
  in.logits_strides[1] = cls ? logits->stride(1) : 0;
  in.settings = settings.const_data_ptr<double>();
  in.problem = pb;
  in.dtype = cuda_dtype_of(scores.scalar_type());
  return in;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> score_forward_cuda(const Tensor& scores, const OptTensor& logits,
                                                                       const Tensor& labels_in, const Tensor& settings,
                                                                       int64_t term_mask, bool smooth_l1,
                                                                       bool ranking_sum) {
  const Problem pb = check_inputs(scores, logits, labels_in, settings, term_mask, smooth_l1, ranking_sum);
  const c10::cuda::CUDAGuard guard(scores.device());
  const Tensor labels = labels_as_read(labels_in, scores);
  Outputs out = empty_outputs(scores, pb);
  const CudaInputs in = cuda_inputs(scores, logits, labels, settings, pb);
  Tensor workspace =
      at::empty({static_cast<int64_t>(forward_workspace_bytes(in))}, scores.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const CudaOutputs o{out.terms.data_ptr(), out.total.data_ptr(), out.counts.data_ptr<int32_t>(),
                      out.rank_scale.data_ptr<double>(), out.status.data_ptr<int32_t>()};
  const cudaError_t status =
      forward_cuda(in, o, workspace.data_ptr(), arrival_counter(scores, stream).data_ptr(), stream);
  TORCH_CHECK(status == cudaSuccess, "score_forward (CUDA) failed: ", cudaGetErrorString(status));
  return {out.terms, out.total, out.counts, out.rank_scale, out.status};
}

std::tuple<Tensor, Tensor> score_backward_cuda(const OptTensor& grad_terms, const OptTensor& grad_total,
                                               const Tensor& counts, const Tensor& rank_scale, const Tensor& scores,
                                               const OptTensor& logits, const Tensor& labels_in,
                                               const Tensor& settings, int64_t term_mask, bool smooth_l1,
                                               bool ranking_sum, std::array<bool, 2> output_mask) {
  const Problem pb = check_inputs(scores, logits, labels_in, settings, term_mask, smooth_l1, ranking_sum);
  check_grads(grad_terms, grad_total, counts, rank_scale, scores, pb);
  const c10::cuda::CUDAGuard guard(scores.device());
  const Tensor labels = labels_as_read(labels_in, scores);
  auto [grad_scores, grad_logits] = empty_gradients(scores, logits, pb, output_mask);
  if (grad_scores.numel() + grad_logits.numel() > 0) {
    const CudaInputs in = cuda_inputs(scores, logits, labels, settings, pb);
    const CudaGradients g{data_or_null(grad_terms), stride_or_zero(grad_terms), data_or_null(grad_total),
                          has(pb.term_mask, kRanking) ? counts.const_data_ptr<int32_t>() : nullptr,
                          rank_scale.const_data_ptr<double>(),
                          grad_scores.numel() ? grad_scores.data_ptr() : nullptr,
                          grad_logits.numel() ? grad_logits.data_ptr() : nullptr};
    const cudaError_t status = backward_cuda(in, g, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "score_backward (CUDA) failed: ", cudaGetErrorString(status));
  }
  return {grad_scores, grad_logits};
}
#endif  // WITH_CUDA

// ---------------------------------------------------------------------------------------------
// Autograd (csrc/common/autograd.h): gradients of scores and logits; labels are targets (constants).
// ---------------------------------------------------------------------------------------------

struct ScoreFunction : public torch::autograd::Function<ScoreFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& scores, const OptTensor& logits,
                               const Tensor& labels, const Tensor& settings, int64_t term_mask, bool smooth_l1,
                               bool ranking_sum) {
    const at::AutoDispatchBelowADInplaceOrView below;
    auto [values, total, counts, rank_scale, status] =
        FL_OPERATOR("score_forward", decltype(score_forward_cpu))
            .call(scores, logits, labels, settings, term_mask, smooth_l1, ranking_sum);
    ctx->save_for_backward({counts, rank_scale, scores, saved_or_undefined(logits), labels, settings});
    ctx->saved_data["term_mask"] = term_mask;
    ctx->saved_data["smooth_l1"] = smooth_l1;
    ctx->saved_data["ranking_sum"] = ranking_sum;
    ctx->mark_non_differentiable({counts, rank_scale, status});
    ctx->set_materialize_grads(false);
    return {values, total, counts, rank_scale, status};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // one per forward argument
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    // Edges: scores 0, then logits 1 when given.
    const bool has_logits = saved[3].defined();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), has_logits && ctx->needs_input_grad(1)};
    if (!mask[0] && !mask[1]) return out;
    auto [grad_scores, grad_logits] = call_backward(
        FL_OPERATOR("score_backward", decltype(score_backward_cpu)), present(grads[0]), present(grads[1]), saved[0],
        saved[1], saved[2], present(saved[3]), saved[4], saved[5], ctx->saved_data["term_mask"].toInt(),
        ctx->saved_data["smooth_l1"].toBool(), ctx->saved_data["ranking_sum"].toBool(), mask);
    if (mask[0]) out[0] = grad_scores;
    if (mask[1]) out[1] = grad_logits;
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> score_forward_autograd(const Tensor& scores,
                                                                          const OptTensor& logits,
                                                                          const Tensor& labels,
                                                                          const Tensor& settings, int64_t term_mask,
                                                                          bool smooth_l1, bool ranking_sum) {
  refuse_grad("score_forward", "settings", settings);
  const variable_list out = ScoreFunction::apply(scores, logits, labels, settings, term_mask, smooth_l1, ranking_sum);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace
}  // namespace score
}  // namespace fusedloss

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def("score_forward(Tensor scores, Tensor? logits, Tensor labels, Tensor settings, int term_mask, bool smooth_l1, "
        "bool ranking_sum) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("score_backward(Tensor? grad_terms, Tensor? grad_total, Tensor counts, Tensor rank_scale, Tensor scores, "
        "Tensor? logits, Tensor labels, Tensor settings, int term_mask, bool smooth_l1, bool ranking_sum, "
        "bool[2] output_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("score_forward", &fusedloss::score::score_forward_autograd);
  m.impl("score_backward", torch::CppFunction::makeFromBoxedFunction<&fusedloss::no_double_backward>());
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("score_forward", &fusedloss::score::score_forward_cpu);
  m.impl("score_backward", &fusedloss::score::score_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("score_forward", &fusedloss::score::score_forward_cuda);
  m.impl("score_backward", &fusedloss::score::score_backward_cuda);
}
#endif
