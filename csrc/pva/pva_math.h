// The PVA loss math shared by the C++ CPU kernels (pva.cpp) and the CUDA kernels
// (pva_cuda.cu): one description of the terms, so forward and backward cannot drift.
//
// With e = pred - target along time t for one column d:
//   P  = err(e[t])                                   rows t in [0, L)
//   V  = err(e[t+1] - e[t])                          rows t in [0, L-1)
//   A  = err(e[t+2] - 2 e[t+1] + e[t])               rows t in [0, L-2)
//   L  = err(pred[:, 0] - cond_frame)                one row per batch element
//   R  = |pred[t]|                                   rows t in [0, L)
// (velocity and acceleration of pred minus those of target are those of e).
// A part (s, e, w, reg_w) turns the column sums S_X[d] of these into terms
//   term(part, X) = scale / count_X * sum_{d in [s, e)} colw_X[d] * S_X[d]
// with scale = w (reg_w for R), colw_X = dim_ws (1 without it, and always 1 for R),
// count_X = rows_X * (e - s), and term = 0 when count_X is 0 ("mean over an empty set").
//
// No torch headers here: nvcc compiles this header into the CUDA kernels.
#pragma once

#include <cstdint>

#include "../common/macros.h"
#include "../common/math.h"

namespace fusedloss {
namespace pva {

// Statistics, in the order their terms appear within a part: P V A [L] [R].
enum Stat : int { kP = 0, kV = 1, kA = 2, kL = 3, kR = 4, kNumStats = 5 };

// Columns of the part table, a float64 tensor [num_parts, kTableCols].
enum TableCol : int { kStart = 0, kEnd = 1, kWeight = 2, kRegWeight = 3, kTableCols = 4 };

struct Options {
  bool l1;          // loss_type "l1": err = |x|; else "l2": err = x^2
  bool last_frame;  // L terms present
  bool reg;         // R terms present
};

// Terms per part: P, V, A, then L and R when enabled.
FL_HOST_DEVICE int terms_per_part(const Options& o) {
  return 3 + (o.last_frame ? 1 : 0) + (o.reg ? 1 : 0);
}

// Statistic of the k-th term of a part.
FL_HOST_DEVICE int term_stat(int k, const Options& o) {
  if (k < 3) return k;
  return (k == 3 && o.last_frame) ? kL : kR;
}

template <typename acc_t>
FL_HOST_DEVICE acc_t err(acc_t x, bool l1) {
  return l1 ? (x < acc_t(0) ? -x : x) : x * x;
}

// d err / dx; the derivative of |x| at 0 is 0, as in torch.abs.
template <typename acc_t>
FL_HOST_DEVICE acc_t err_grad(acc_t x, bool l1) {
  if (l1) return sign(x);
  return acc_t(2) * x;
}

// Ditto's convention: start <= 0 means 0 and end <= 0 means D.
FL_HOST_DEVICE void part_span(const double* table_row, int64_t D, int64_t* start, int64_t* end) {
  const int64_t s = static_cast<int64_t>(table_row[kStart]);
  const int64_t e = static_cast<int64_t>(table_row[kEnd]);
  *start = s > 0 ? s : 0;
  *end = e > 0 ? e : D;
}

// Number of rows (per column) a statistic's mean runs over; may be <= 0.
FL_HOST_DEVICE int64_t stat_rows(int stat, int64_t B, int64_t L) {
  switch (stat) {
    case kV: return B * (L - 1);
    case kA: return B * (L - 2);
    case kL: return B;
    default: return B * L;  // kP, kR
  }
}

// Factor that turns a part's weighted column sum into its term: scale / count, or 0.
template <typename acc_t>
FL_HOST_DEVICE acc_t term_factor(const double* table_row, int stat, int64_t B, int64_t L, int64_t width) {
  const int64_t count = stat_rows(stat, B, L) * width;
  if (count <= 0) return acc_t(0);
  const double scale = stat == kR ? table_row[kRegWeight] : table_row[kWeight];
  return static_cast<acc_t>(scale) / static_cast<acc_t>(count);
}

}  // namespace pva
}  // namespace fusedloss
