// The blendshape loss math shared by the C++ CPU kernels (blendshape.cpp) and the CUDA kernels
// (blendshape_cuda.cu): one description of the sums, the terms and their gradients.
//
// Inputs are viewed as [B, T, K] (T = 1 for [B, K]); e = pred - target; column c = (t, k).
// The forward accumulates sums over all elements, and for the default perceptual form the
// column sums colT[c] = sum_b target, colS2[c] = sum_b e^2, from which
//   w[c] = colT[c] / B (importance weights, target.mean(0)) and
//   weighted = sum_c w[c]^2 colS2[c] / N        (N = B T K elements).
// Terms (each a sum over a count):
//   mse          sum e^2                           / N
//   l1           sum |e|                           / N
//   perceptual   (sum [pred > thr] xor [target > thr] + sum_c w^2 colS2) / N      default form
//                sum_k group_coef[k] e^2            / (B T)                         group form
//   temporal     sum (e[t+1] - e[t])^2             / (B (T-1) K)
//   landmark     sum_rows e^T G e  (G = M^T M)     / (B T J)
//   smoothing    sum |pred - raw_pred|             / N
//   consistency  sum (pred - prev_pred)^2          / N
// total = sum over computed terms of weight * term. With c_x = d(loss)/d(term x) / count_x:
//   d/de      = 2 c_mse e + c_l1 sign(e) + 2 c_perc w[c]^2 e  (or 2 c_perc group_coef[k] e)
//               + 2 c_temporal ((e[t] - e[t-1]) - (e[t+1] - e[t])) + 2 c_landmark (G e)[k]
//   d/dpred   = d/de + c_smoothing sign(pred - raw) + 2 c_consistency (pred - prev)
//   d/dtarget = -d/de + 2 c_perc w[c] colS2[c] / B   (through the importance weights)
//   d/draw    = -c_smoothing sign(pred - raw)
// No torch headers here: nvcc compiles this header into the CUDA kernels.
#pragma once

#include <cstdint>

#include "../common/macros.h"
#include "../common/math.h"

namespace fusedloss {
namespace blendshape {

// Terms in output order; bit i of a term mask says whether term i is computed.
enum Term : int { kMse, kL1, kPerceptual, kTemporal, kLandmark, kSmoothing, kConsistency, kNumTerms };
// The settings table: the weights of the terms, then the threshold.
constexpr int kThreshold = kNumTerms;
constexpr int kNumSettings = kNumTerms + 1;

// Sums the forward accumulates.
enum Sum : int { kSqErr, kAbsErr, kActive, kGroupSq, kTemporalSq, kLandmarkSq, kSmoothAbs, kConsistencySq, kNumSums };
// A block's (Triton program's) row of partial sums: the sums, then the weighted sum of the default
// perceptual form, padded to a power of two.
constexpr int kWeightedSum = kNumSums;
constexpr int kPartialsWidth = 16;
static_assert(kWeightedSum < kPartialsWidth, "partials row too short");
// Rows of col_stats [2, T*K] (default perceptual form): importance weights, then sum_b e^2.
enum ColStat : int { kColImportance = 0, kColSqErr = 1 };
// At most this many column partials ([batch groups, 2, T*K] scratch) per forward: wide inputs use
// fewer batch groups rather than more scratch.
constexpr int64_t kColumnPartialsMax = int64_t(1) << 17;

struct Problem {
  int64_t B, T, K;
  int64_t J;        // landmark rows (the matrix is [J, K])
  int term_mask;        // term mask
  bool group_form;  // perceptual as groups (else the default form with importance weights)
};

FL_HOST_DEVICE bool has(int term_mask, int term) { return (term_mask >> term) & 1; }

// Position of a computed term in the output.
FL_HOST_DEVICE int term_index(int term_mask, int term) {
  int index = 0;
  for (int i = 0; i < term; ++i) index += has(term_mask, i);
  return index;
}

// The count a term's sum is divided by (0: mean over an empty set, the term is 0).
FL_HOST_DEVICE int64_t term_count(const Problem& p, int term) {
  const int64_t n = p.B * p.T * p.K;
  switch (term) {
    case kPerceptual: return p.group_form ? p.B * p.T : n;
    case kTemporal: return p.B * (p.T - 1) * p.K;
    case kLandmark: return p.B * p.T * p.J;
    default: return n;
  }
}

// A term's value from the sums (weighted_sum = sum_c w[c]^2 colS2[c], default perceptual only).
template <typename acc_t>
FL_HOST_DEVICE acc_t term_value(const Problem& p, int term, const acc_t* sums, acc_t weighted_sum) {
  const int64_t count = term_count(p, term);
  if (count <= 0) return acc_t(0);
  acc_t s = 0;
  switch (term) {
    case kMse: s = sums[kSqErr]; break;
    case kL1: s = sums[kAbsErr]; break;
    case kPerceptual: s = p.group_form ? sums[kGroupSq] : sums[kActive] + weighted_sum; break;
    case kTemporal: s = sums[kTemporalSq]; break;
    case kLandmark: s = sums[kLandmarkSq]; break;
    case kSmoothing: s = sums[kSmoothAbs]; break;
    case kConsistency: s = sums[kConsistencySq]; break;
  }
  return s / static_cast<acc_t>(count);
}

// c_x = (grad_terms[index of x] + weight_x * grad_total) / count_x, or 0 for a term not computed.
// A null grad_terms (no gradient reaches the terms) reads as 0.
template <typename acc_t>
FL_HOST_DEVICE acc_t grad_coefficient(const Problem& p, int term, const acc_t* grad_terms, int64_t g_stride,
                                      acc_t grad_total, const double* settings) {
  const int64_t count = term_count(p, term);
  if (!has(p.term_mask, term) || count <= 0) return acc_t(0);
  const acc_t g_term = grad_terms != nullptr ? grad_terms[term_index(p.term_mask, term) * g_stride] : acc_t(0);
  const acc_t g = g_term + static_cast<acc_t>(settings[term]) * grad_total;
  return g / static_cast<acc_t>(count);
}

// The threshold rounded to the inputs' dtype, as PyTorch compares a tensor with a Python float
// (double -> float -> dtype, like c10's scalar conversion). round(x) rounds a float to scalar_t and
// back to acc_t: casts on the CPU; on the GPU the conversions torch's nvcc flags allow.
template <typename scalar_t, typename acc_t, typename Round>
FL_HOST_DEVICE acc_t threshold_as(double threshold, Round round) {
  if constexpr (sizeof(scalar_t) == 8) return static_cast<acc_t>(threshold);
  else return round(static_cast<float>(threshold));
}

}  // namespace blendshape
}  // namespace fusedloss
