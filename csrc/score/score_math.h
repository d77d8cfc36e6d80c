// The score loss math (TIGAS, docs/losses.md §3) shared by the C++ CPU kernels (score.cpp) and the CUDA
// kernels (score_cuda.cu): the terms per element, the hinge's activity test, and the searches
// that count active pairs without forming the |R| x |F| pair matrix.
//
// Per element k: s = scores[k], y = labels[k], real = y > 0.5, logits (l0, l1), class c = real.
//   regression      (s - y)^2, or smooth-L1 (beta 1) of s - y          mean over B
//   classification  -log softmax(l)[c] = softplus(l[1-c] - l[c])      mean over B
//   ranking         sum over pairs (i real, j fake) of max(0, m - (s_i - s_j)),
//                   divided by |R| |F| ("mean") or not ("sum")
// A pair is active where fl(m - fl(s_i - s_j)) >= 0, evaluated in the arithmetic type exactly as
// the reference's pair matrix does. That test is monotone in each score (rounding is monotone), so
// over sorted scores the active partners of an element form a suffix (for a real score, among the
// fakes) or a prefix (for a fake score, among the reals), found by binary search. With
//   count_k = the number of active partners of k,
// the ranking sum is  sum_{i real} count_i (m - s_i) + sum_{j fake} count_j s_j
// and its gradient is  d sum / d s_k = -count_k (k real), +count_k (k fake).
// The forward stores the signed count (-count for real, +count for fake) for the backward.
// total = w_reg regression + w_cls classification + w_rank ranking.
// No torch headers here: nvcc compiles this header into the CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/macros.h"

namespace fusedloss {
namespace score {

// Terms in output order; bit i of a term mask says whether term i is computed.
enum Term : int { kRegression, kClassification, kRanking, kNumTerms };
// The settings table (float64): the three weights, then the margin.
constexpr int kMargin = kNumTerms;
constexpr int kNumSettings = kNumTerms + 1;
// Bits of the status the forward reports (check_finite).
enum Status : int { kScoresNotFinite = 1, kLogitsNotFinite = 2, kTotalNotFinite = 4 };
// Largest batch whose ranking the CUDA forward counts by comparing every pair (beyond: it sorts).
// The reasoning, and Triton's limit: fusedloss/score/layout.py ALL_PAIRS_MAX.
constexpr int64_t kCudaAllPairsMax = 4096;

struct Problem {
  int64_t B;
  int term_mask;         // term mask
  bool smooth_l1;    // regression: smooth-L1 (beta 1), else squared error
  bool ranking_sum;  // ranking: sum over pairs, else mean
};

FL_HOST_DEVICE bool has(int term_mask, int term) { return (term_mask >> term) & 1; }

FL_HOST_DEVICE bool is_real(double label) { return label > 0.5; }

// The hinge max(0, m - (s_i - s_j)) of a real score s_i and a fake score s_j is active (counts,
// and passes gradient) where this holds. Two subtractions: no contraction into an FMA.
template <typename acc_t>
FL_HOST_DEVICE bool active(acc_t margin, acc_t real_score, acc_t fake_score) {
  return margin - (real_score - fake_score) >= acc_t(0);
}

// Active fakes of a real score: fakes[0, n) ascending; active() is false then true along it, so
// the count is n minus the first active position.
template <typename acc_t, typename Row>
FL_HOST_DEVICE int64_t active_fakes(acc_t margin, acc_t real_score, const Row& fakes, int64_t n) {
  int64_t lo = 0, hi = n;  // first active position lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (active(margin, real_score, acc_t(fakes[mid]))) hi = mid;
    else lo = mid + 1;
  }
  return n - lo;
}

// Active reals of a fake score: reals[0, n) ascending; active() is true then false along it, so
// the count is the first inactive position.
template <typename acc_t, typename Row>
FL_HOST_DEVICE int64_t active_reals(acc_t margin, acc_t fake_score, const Row& reals, int64_t n) {
  int64_t lo = 0, hi = n;  // first inactive position lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (active(margin, acc_t(reals[mid]), fake_score)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Element k's share of the ranking sum, from its signed count (-count real, +count fake):
// count (m - s) for a real score, count s for a fake one. In double: the shares of real and fake
// scores cancel to the (much smaller) hinge sum.
FL_HOST_DEVICE double ranking_share(int64_t signed_count, double margin, double s) {
  return signed_count < 0 ? double(-signed_count) * (margin - s) : double(signed_count) * s;
}

template <typename acc_t>
FL_HOST_DEVICE acc_t regression_value(acc_t d, bool smooth_l1) {
  if (!smooth_l1) return d * d;
  const acc_t a = d < acc_t(0) ? -d : d;
  return a < acc_t(1) ? acc_t(0.5) * d * d : a - acc_t(0.5);
}

// d/ds of regression_value at d = s - y.
template <typename acc_t>
FL_HOST_DEVICE acc_t regression_grad(acc_t d, bool smooth_l1) {
  if (!smooth_l1) return acc_t(2) * d;
  return d < acc_t(-1) ? acc_t(-1) : (d > acc_t(1) ? acc_t(1) : d);
}

// softplus(x) = log(1 + exp(x)), stable for every x.
template <typename acc_t>
FL_HOST_DEVICE acc_t softplus(acc_t x) {
  using std::exp;
  using std::log1p;
  return (x > acc_t(0) ? x : acc_t(0)) + log1p(exp(-(x < acc_t(0) ? -x : x)));
}

template <typename acc_t>
FL_HOST_DEVICE acc_t sigmoid(acc_t x) {
  using std::exp;
  return acc_t(1) / (acc_t(1) + exp(-x));
}

// l[1-c] - l[c] of class c (real: c = 1), NaN where a logit is +inf: log_softmax's
// logsumexp(l) - l[c] is then inf - inf (torch's cross-entropy and its gradient are NaN).
template <typename acc_t>
FL_HOST_DEVICE acc_t logit_gap(acc_t l0, acc_t l1, bool real) {
  if (l0 == acc_t(INFINITY) || l1 == acc_t(INFINITY)) return acc_t(NAN);
  return real ? l0 - l1 : l1 - l0;
}

// Cross-entropy of two logits against class c: softplus(l[1-c] - l[c]). Its gradient is
// d/dl[1-c] = sigmoid(l[1-c] - l[c]) = -d/dl[c].
template <typename acc_t>
FL_HOST_DEVICE acc_t cross_entropy(acc_t l0, acc_t l1, bool real) {
  return softplus(logit_gap(l0, l1, real));
}

}  // namespace score
}  // namespace fusedloss
