// PVA loss: operator schemas, C++ CPU kernels, and the CUDA dispatch (kernels in pva_cuda.cu).
//
// fusedloss::pva_forward  reads pred and target once and returns every term of every part
//                         (terms [P*K] in part order, P V A [L] [R] within a part) and their sum.
// fusedloss::pva_backward takes d(loss)/d(terms) [P*K] (any stride, 0 included) and writes the
//                         gradients of pred, target and cond_frame in one more pass.
// The math is described once, in pva_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../common/autograd.h"
#include "../common/macros.h"
#include "pva_math.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/arrival_counter.h"
#include "../common/cuda_dtype_of.h"
#include "pva_cuda.h"
#endif

namespace fusedloss {
namespace pva {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Options parse_options(std::string_view loss_type, bool use_last_frame, bool use_reg) {
  TORCH_CHECK(loss_type == "l2" || loss_type == "l1",
              "pva: loss_type must be \"l2\" or \"l1\", got \"", std::string(loss_type), "\"");
  return Options{loss_type == "l1", use_last_frame, use_reg};
}

// Boundary checks; fusedloss.functional validates user input with friendlier messages first.
void check_inputs(const Tensor& pred, const Tensor& target, const std::optional<Tensor>& cond,
                  const Tensor& table, const std::optional<Tensor>& dim_ws, const Options& o) {
  TORCH_CHECK(pred.dim() == 3 && pred.size(1) >= 1 && pred.size(2) >= 1,
              "pva: pred must be [B, L, D] with L, D >= 1, got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), "pva: target must match pred ", pred.sizes(),
              ", got ", target.sizes());
  TORCH_CHECK(at::isFloatingType(pred.scalar_type()), "pva: pred must be floating point");
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), "pva: target dtype must match pred");
  TORCH_CHECK(target.device() == pred.device(), "pva: target must be on pred's device");
  TORCH_CHECK(table.dim() == 2 && table.size(1) == kTableCols && table.size(0) >= 1 &&
                  table.scalar_type() == at::kDouble && table.is_contiguous() &&
                  table.device() == pred.device(),
              "pva: part_table must be a contiguous float64 [P, 4] tensor on pred's device");
  if (o.last_frame) {
    TORCH_CHECK(cond.has_value(), "pva: cond_frame is required with use_last_frame");
    TORCH_CHECK(cond->dim() == 2 && cond->size(0) == pred.size(0) && cond->size(1) == pred.size(2),
                "pva: cond_frame must be [B, D]");
    TORCH_CHECK(cond->scalar_type() == pred.scalar_type() && cond->device() == pred.device(),
                "pva: cond_frame must have pred's dtype and device");
  }
  if (dim_ws.has_value()) {
    TORCH_CHECK(dim_ws->dim() == 1 && dim_ws->size(0) == pred.size(2) &&
                    dim_ws->scalar_type() == at::kDouble && dim_ws->is_contiguous() &&
                    dim_ws->device() == pred.device(),
                "pva: dim_ws must be a contiguous float64 [D] tensor on pred's device");
  }
}

// The part spans must lie inside [0, D]; only checkable here for a table in host memory. (The CUDA
// kernels mask columns with d < D, so a bad device table cannot touch memory out of bounds; the
// Python layer validates the spans before building the table.)
void check_spans_cpu(const Tensor& table, int64_t D) {
  const double* rows = table.data_ptr<double>();
  for (int64_t p = 0; p < table.size(0); ++p) {
    int64_t s, e;
    part_span(rows + p * kTableCols, D, &s, &e);
    TORCH_CHECK(0 <= s && s < e && e <= D, "pva: part ", p, " spans [", s, ", ", e,
                ") which is not inside [0, ", D, ")");
  }
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The forward outputs: terms [P * K] and total [], of the arithmetic type.
std::tuple<Tensor, Tensor> empty_terms(const Tensor& pred, int64_t num_parts, const Options& o) {
  const auto options = pred.options().dtype(acc_type_of(pred.scalar_type()));
  return {at::empty({num_parts * terms_per_part(o)}, options), at::empty({}, options)};
}

void check_grads(const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& pred, int64_t num_parts,
                 const Options& o) {
  const auto acc = acc_type_of(pred.scalar_type());
  TORCH_CHECK(!grad_terms || (grad_terms->dim() == 1 && grad_terms->size(0) == num_parts * terms_per_part(o) &&
                              grad_terms->scalar_type() == acc && grad_terms->device() == pred.device()),
              "pva: grad_terms must be a [P*K] tensor of the terms' dtype");
  TORCH_CHECK(!grad_total ||
                  (grad_total->dim() == 0 && grad_total->scalar_type() == acc && grad_total->device() == pred.device()),
              "pva: grad_total must be a 0-dim tensor of the terms' dtype");
}

// The backward outputs (pred's dtype, contiguous): an empty tensor for each one not wanted.
struct Gradients {
  Tensor pred, target, cond;
};
Gradients empty_gradients(const Tensor& pred, std::array<bool, 3> output_mask, const Options& o) {
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2);
  const auto none = [&] { return at::empty({0}, pred.options()); };
  return {output_mask[0] ? at::empty({B, L, D}, pred.options()) : none(),
          output_mask[1] ? at::empty({B, L, D}, pred.options()) : none(),
          output_mask[2] && o.last_frame ? at::empty({B, D}, pred.options()) : none()};
}

// ----------------------------------------------------------------------------------------------
// CPU kernels
// ----------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Rows {
  const scalar_t* pred;
  const scalar_t* target;
  const scalar_t* cond;  // null without last-frame terms
  int64_t B, L, D;
  int64_t sp_b, sp_t, sp_d, sq_b, sq_t, sq_d, sc_b, sc_d;  // strides of pred, target, cond_frame
};

template <typename scalar_t>
Rows<scalar_t> make_rows(const Tensor& pred, const Tensor& target, const std::optional<Tensor>& cond,
                         bool use_cond) {
  Rows<scalar_t> r{};
  r.pred = pred.const_data_ptr<scalar_t>();
  r.target = target.const_data_ptr<scalar_t>();
  r.B = pred.size(0);
  r.L = pred.size(1);
  r.D = pred.size(2);
  r.sp_b = pred.stride(0), r.sp_t = pred.stride(1), r.sp_d = pred.stride(2);
  r.sq_b = target.stride(0), r.sq_t = target.stride(1), r.sq_d = target.stride(2);
  if (use_cond) {
    r.cond = cond->const_data_ptr<scalar_t>();
    r.sc_b = cond->stride(0), r.sc_d = cond->stride(1);
  }
  return r;
}

// A row of D values as acc_t: the input itself when it already is (contiguous acc_t), else
// converted into buf (the one read of that row).
template <typename acc_t, typename scalar_t>
inline const acc_t* acc_row(const scalar_t* x, int64_t stride, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return x;
  }
  for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(x[d * stride]);
  return buf;
}

// Scratch rows of D values of one thread: rings over time (slot t % size) and buffers.
enum ScratchRow : int {
  kErrorRing = 0,      // e = pred - target, 3 slots
  kPredRing = 3,       // pred (backward, for R), 3 slots
  kVelocityRing = 6,   // gv (backward), 2 slots
  kAccelRing = 8,      // ga (backward), 3 slots
  kPredBuf = 11,       // conversion buffers
  kTargetBuf = 12,
  kGradRow = 13,       // d/de of one row (backward)
  kLastFrameRow = 14,  // cL err'(pred[0] - cond) (backward)
  kNumScratchRows = 15
};

template <typename acc_t>
struct Scratch {
  explicit Scratch(int64_t D) : D(D), data(kNumScratchRows * D) {}
  acc_t* row(int i) { return data.data() + i * D; }
  acc_t* ring(ScratchRow first, int64_t t, int slots) { return row(first + static_cast<int>(t % slots)); }
  int64_t D;
  std::vector<acc_t> data;
};

// Row loops. Each takes FL_R (restrict) pointers (its rows never overlap) so the compiler
// vectorises it; they are inlined into the cloned (FL_CPU_CLONES) per-batch-element functions below.

// e0 = p - q and the column sums of P, and of V and A once rows t-1 (em1), t-2 (em2) exist.
template <typename acc_t, bool kL1, int kOrder>
inline void accumulate_row(int64_t D, const acc_t* FL_R p, const acc_t* FL_R q, acc_t* FL_R e0,
                           const acc_t* FL_R em1, const acc_t* FL_R em2, acc_t* FL_R SP, acc_t* FL_R SV,
                           acc_t* FL_R SA) {
  for (int64_t d = 0; d < D; ++d) {
    const acc_t x = p[d] - q[d];
    e0[d] = x;
    SP[d] += err(x, kL1);
    if constexpr (kOrder >= 1) SV[d] += err(x - em1[d], kL1);
    if constexpr (kOrder >= 2) SA[d] += err(x - acc_t(2) * em1[d] + em2[d], kL1);
  }
}

template <typename acc_t>
inline void add_abs(int64_t D, const acc_t* FL_R x, acc_t* FL_R sum) {
  for (int64_t d = 0; d < D; ++d) sum[d] += std::abs(x[d]);
}

template <typename acc_t>
inline void difference(int64_t D, const acc_t* FL_R p, const acc_t* FL_R q, acc_t* FL_R out) {
  for (int64_t d = 0; d < D; ++d) out[d] = p[d] - q[d];
}

// gv = err'(e1 - e0), ga = err'(e2 - 2 e1 + e0) (scaled by 0 past their last row), and
// g = d/de[t] = cP err'(e0) + cV (gv[t-1] - gv) + cA (ga[t-2] - 2 ga[t-1] + ga).
template <typename acc_t, bool kL1>
inline void gradient_row(int64_t D, const acc_t* FL_R e0, const acc_t* FL_R e1, const acc_t* FL_R e2,
                         acc_t* FL_R gv, const acc_t* FL_R gv_m1, acc_t* FL_R ga, const acc_t* FL_R ga_m1,
                         const acc_t* FL_R ga_m2, const acc_t* FL_R cP, const acc_t* FL_R cV,
                         const acc_t* FL_R cA, acc_t* FL_R g, acc_t v_on, acc_t a_on) {
  for (int64_t d = 0; d < D; ++d) {
    const acc_t v = v_on * err_grad(e1[d] - e0[d], kL1);
    const acc_t a = a_on * err_grad(e2[d] - acc_t(2) * e1[d] + e0[d], kL1);
    gv[d] = v;
    ga[d] = a;
    g[d] = cP[d] * err_grad(e0[d], kL1) + cV[d] * (gv_m1[d] - v) + cA[d] * (ga_m2[d] - acc_t(2) * ga_m1[d] + a);
  }
}

template <typename acc_t>
inline void add_scaled_sign(int64_t D, const acc_t* FL_R x, const acc_t* FL_R scale, acc_t* FL_R g) {
  for (int64_t d = 0; d < D; ++d) g[d] += scale[d] * sign(x[d]);
}

template <typename scalar_t, typename acc_t>
inline void store_row(int64_t D, const acc_t* FL_R x, acc_t factor, scalar_t* FL_R out) {
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(factor * x[d]);
}

// Column sums S[stat][d] of batch element b, added to S.
template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
FL_CPU_CLONES void column_sums(const Rows<scalar_t>& r, bool last_frame, int64_t b, acc_t* S, Scratch<acc_t>& w) {
  const int64_t D = r.D;
  acc_t* SP = S + kP * D;
  acc_t* SV = S + kV * D;
  acc_t* SA = S + kA * D;
  acc_t* SR = S + kR * D;
  acc_t* p_buf = w.row(kPredBuf);
  acc_t* q_buf = w.row(kTargetBuf);
  if (last_frame) {
    const acc_t* p0 = acc_row<acc_t>(r.pred + b * r.sp_b, r.sp_d, D, p_buf);
    const acc_t* c = acc_row<acc_t>(r.cond + b * r.sc_b, r.sc_d, D, q_buf);
    acc_t* SL = S + kL * D;
    for (int64_t d = 0; d < D; ++d) SL[d] += err(p0[d] - c[d], kL1);
  }
  for (int64_t t = 0; t < r.L; ++t) {
    acc_t* e0 = w.ring(kErrorRing, t, 3);
    const acc_t* em1 = w.ring(kErrorRing, t + 2, 3);  // row t-1
    const acc_t* em2 = w.ring(kErrorRing, t + 1, 3);  // row t-2
    const acc_t* p = acc_row<acc_t>(r.pred + b * r.sp_b + t * r.sp_t, r.sp_d, D, p_buf);
    const acc_t* q = acc_row<acc_t>(r.target + b * r.sq_b + t * r.sq_t, r.sq_d, D, q_buf);
    if (kReg) add_abs(D, p, SR);
    if (t >= 2) accumulate_row<acc_t, kL1, 2>(D, p, q, e0, em1, em2, SP, SV, SA);
    else if (t == 1) accumulate_row<acc_t, kL1, 1>(D, p, q, e0, em1, em2, SP, SV, SA);
    else accumulate_row<acc_t, kL1, 0>(D, p, q, e0, em1, em2, SP, SV, SA);
  }
}

// Fixed batch chunks (independent of the thread count) keep the sums deterministic.
int64_t batch_chunk(int64_t B) { return std::max<int64_t>(1, (B + 63) / 64); }

template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
void column_sums_chunks(const Rows<scalar_t>& r, const Options& o, int64_t chunk, int64_t nchunks,
                        std::vector<acc_t>& partial) {
  const int64_t D = r.D;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    Scratch<acc_t> scratch(D);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* S = partial.data() + c * kNumStats * D;
      for (int64_t b = c * chunk; b < std::min(r.B, (c + 1) * chunk); ++b)
        column_sums<scalar_t, acc_t, kL1, kReg>(r, o.last_frame, b, S, scratch);
    }
  });
}

template <typename scalar_t>
void forward_cpu(const Rows<scalar_t>& r, const Options& o, const double* table, int64_t P,
                 const double* dim_ws, Tensor& terms, Tensor& total) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t D = r.D, chunk = batch_chunk(r.B);
  const int64_t nchunks = std::max<int64_t>(1, (r.B + chunk - 1) / chunk);  // one (empty) for B = 0
  std::vector<acc_t> partial(nchunks * kNumStats * D, acc_t(0));
  if (o.l1) {
    if (o.reg) column_sums_chunks<scalar_t, acc_t, true, true>(r, o, chunk, nchunks, partial);
    else column_sums_chunks<scalar_t, acc_t, true, false>(r, o, chunk, nchunks, partial);
  } else {
    if (o.reg) column_sums_chunks<scalar_t, acc_t, false, true>(r, o, chunk, nchunks, partial);
    else column_sums_chunks<scalar_t, acc_t, false, false>(r, o, chunk, nchunks, partial);
  }
  for (int64_t c = 1; c < nchunks; ++c)
    for (int64_t i = 0; i < kNumStats * D; ++i) partial[i] += partial[c * kNumStats * D + i];
  const acc_t* S = partial.data();

  const int K = terms_per_part(o);
  acc_t* out = terms.data_ptr<acc_t>();
  acc_t sum = 0;
  for (int64_t p = 0; p < P; ++p) {
    const double* row = table + p * kTableCols;
    int64_t s, e;
    part_span(row, D, &s, &e);
    for (int k = 0; k < K; ++k) {
      const int stat = term_stat(k, o);
      const bool dim_weighted = dim_ws != nullptr && stat != kR;
      acc_t acc = 0;
      for (int64_t d = s; d < e; ++d)
        acc += (dim_weighted ? static_cast<acc_t>(dim_ws[d]) : acc_t(1)) * S[stat * D + d];
      const acc_t term = acc * term_factor<acc_t>(row, stat, r.B, r.L, e - s);
      out[p * K + k] = term;
      sum += term;
    }
  }
  *total.data_ptr<acc_t>() = sum;
}

// coef[stat][d] = sum over parts containing d of g(part, stat) * factor (* dim_ws[d] unless R), with
// g = d(loss)/d(term) = grad_terms + grad_total:
// the gradient of the loss with respect to one element's statistic.
template <typename acc_t>
std::vector<acc_t> column_coefficients(const Options& o, const double* table, int64_t P,
                                       const double* dim_ws, const acc_t* grad_terms,
                                       int64_t g_stride, acc_t grad_total, int64_t B, int64_t L, int64_t D) {
  std::vector<acc_t> coef(kNumStats * D, acc_t(0));
  const int K = terms_per_part(o);
  for (int64_t p = 0; p < P; ++p) {
    const double* row = table + p * kTableCols;
    int64_t s, e;
    part_span(row, D, &s, &e);
    for (int k = 0; k < K; ++k) {
      const int stat = term_stat(k, o);
      // total = sum of the terms; a null grad_terms reads as 0
      const acc_t g = (grad_terms != nullptr ? grad_terms[(p * K + k) * g_stride] : acc_t(0)) + grad_total;
      const acc_t c = g * term_factor<acc_t>(row, stat, B, L, e - s);
      const bool dim_weighted = dim_ws != nullptr && stat != kR;
      for (int64_t d = s; d < e; ++d)
        coef[stat * D + d] += dim_weighted ? c * static_cast<acc_t>(dim_ws[d]) : c;
    }
  }
  return coef;
}

// Gradients of batch element b. With gv[t] = err'(e[t+1] - e[t]) and
// ga[t] = err'(e[t+2] - 2 e[t+1] + e[t]) (0 outside their row ranges):
//   d/de[t]     = cP err'(e[t]) + cV (gv[t-1] - gv[t]) + cA (ga[t-2] - 2 ga[t-1] + ga[t])
//   d/dpred[t]  = d/de[t] + cR sign(pred[t]) + [t == 0] cL err'(pred[0] - cond)
//   d/dtarget   = -d/de,    d/dcond = -cL err'(pred[0] - cond)
// Rows of e (and pred, for R) are loaded two steps ahead into rings.
template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
FL_CPU_CLONES void gradient_rows(const Rows<scalar_t>& r, bool last_frame, const acc_t* coef, int64_t b,
                                 scalar_t* grad_pred, scalar_t* grad_target, scalar_t* grad_cond,
                                 Scratch<acc_t>& w) {
  const int64_t D = r.D, L = r.L;
  const acc_t* cP = coef + kP * D;
  const acc_t* cV = coef + kV * D;
  const acc_t* cA = coef + kA * D;
  const acc_t* cL = coef + kL * D;
  const acc_t* cR = coef + kR * D;
  auto load = [&](int64_t t) {  // e (and pred) of row t into their ring slots
    acc_t* pr = w.ring(kPredRing, t, 3);
    const acc_t* p = acc_row<acc_t>(r.pred + b * r.sp_b + t * r.sp_t, r.sp_d, D, pr);
    const acc_t* q = acc_row<acc_t>(r.target + b * r.sq_b + t * r.sq_t, r.sq_d, D, w.row(kTargetBuf));
    difference(D, p, q, w.ring(kErrorRing, t, 3));
    if (kReg && p != pr) std::copy(p, p + D, pr);
  };
  load(0);
  if (L > 1) load(1);
  std::fill(w.row(kVelocityRing), w.row(kVelocityRing + 2), acc_t(0));  // gv[-1]
  std::fill(w.row(kAccelRing), w.row(kAccelRing + 3), acc_t(0));        // ga[-2], ga[-1]
  acc_t* g = w.row(kGradRow);
  for (int64_t t = 0; t < L; ++t) {
    if (t + 2 < L) load(t + 2);
    gradient_row<acc_t, kL1>(D, w.ring(kErrorRing, t, 3), w.ring(kErrorRing, t + 1, 3),
                             w.ring(kErrorRing, t + 2, 3), w.ring(kVelocityRing, t, 2),
                             w.ring(kVelocityRing, t + 1, 2), w.ring(kAccelRing, t, 3),
                             w.ring(kAccelRing, t + 2, 3), w.ring(kAccelRing, t + 1, 3), cP, cV, cA, g,
                             t + 1 < L ? acc_t(1) : acc_t(0), t + 2 < L ? acc_t(1) : acc_t(0));
    if (grad_target) store_row(D, g, acc_t(-1), grad_target + (b * L + t) * D);
    if (!grad_pred && !grad_cond) continue;
    if (kReg) add_scaled_sign(D, w.ring(kPredRing, t, 3), cR, g);
    if (t == 0 && last_frame) {  // the last-frame term joins d/dpred before the one rounding
      const acc_t* p0 = acc_row<acc_t>(r.pred + b * r.sp_b, r.sp_d, D, w.row(kPredBuf));
      const acc_t* c = acc_row<acc_t>(r.cond + b * r.sc_b, r.sc_d, D, w.row(kTargetBuf));
      acc_t* gl = w.row(kLastFrameRow);
      for (int64_t d = 0; d < D; ++d) gl[d] = cL[d] * err_grad(p0[d] - c[d], kL1);
      for (int64_t d = 0; d < D; ++d) g[d] += gl[d];
      if (grad_cond) store_row(D, gl, acc_t(-1), grad_cond + b * D);
    }
    if (grad_pred) store_row(D, g, acc_t(1), grad_pred + (b * L + t) * D);
  }
}

template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
void gradient_all(const Rows<scalar_t>& r, bool last_frame, const acc_t* coef, scalar_t* gp, scalar_t* gq,
                  scalar_t* gc) {
  at::parallel_for(0, r.B, 1, [&](int64_t b0, int64_t b1) {
    Scratch<acc_t> scratch(r.D);
    for (int64_t b = b0; b < b1; ++b)
      gradient_rows<scalar_t, acc_t, kL1, kReg>(r, last_frame, coef, b, gp, gq, gc, scratch);
  });
}

// ----------------------------------------------------------------------------------------------
// Operators
// ----------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> pva_forward_cpu(const Tensor& pred, const Tensor& target,
                                           const std::optional<Tensor>& cond_frame,
                                           const Tensor& part_table, const std::optional<Tensor>& dim_ws,
                                           std::string_view loss_type, bool use_last_frame, bool use_reg) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  check_spans_cpu(part_table, pred.size(2));
  const int64_t P = part_table.size(0);
  auto [terms, total] = empty_terms(pred, P, o);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pva_forward_cpu", [&] {
    const auto rows = make_rows<scalar_t>(pred, target, cond_frame, o.last_frame);
    forward_cpu<scalar_t>(rows, o, part_table.const_data_ptr<double>(), P,
                          dim_ws ? dim_ws->const_data_ptr<double>() : nullptr, terms, total);
  });
  return {terms, total};
}

std::tuple<Tensor, Tensor, Tensor> pva_backward_cpu(
    const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& pred, const Tensor& target,
    const std::optional<Tensor>& cond_frame, const Tensor& part_table,
    const std::optional<Tensor>& dim_ws, std::string_view loss_type, bool use_last_frame,
    bool use_reg, std::array<bool, 3> output_mask) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  check_spans_cpu(part_table, pred.size(2));
  const int64_t P = part_table.size(0), B = pred.size(0), L = pred.size(1), D = pred.size(2);
  check_grads(grad_terms, grad_total, pred, P, o);
  Gradients grads = empty_gradients(pred, output_mask, o);
  if (grads.pred.numel() + grads.target.numel() + grads.cond.numel() == 0) return {grads.pred, grads.target, grads.cond};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pva_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = make_rows<scalar_t>(pred, target, cond_frame, o.last_frame);
    const std::vector<acc_t> coef = column_coefficients<acc_t>(
        o, part_table.const_data_ptr<double>(), P, dim_ws ? dim_ws->const_data_ptr<double>() : nullptr,
        static_cast<const acc_t*>(data_or_null(grad_terms)), stride_or_zero(grad_terms),
        value_or_zero<acc_t>(grad_total), B, L, D);
    scalar_t* gp = grads.pred.numel() ? grads.pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gq = grads.target.numel() ? grads.target.data_ptr<scalar_t>() : nullptr;
    scalar_t* gc = grads.cond.numel() ? grads.cond.data_ptr<scalar_t>() : nullptr;
    if (o.l1) {
      if (o.reg) gradient_all<scalar_t, acc_t, true, true>(rows, o.last_frame, coef.data(), gp, gq, gc);
      else gradient_all<scalar_t, acc_t, true, false>(rows, o.last_frame, coef.data(), gp, gq, gc);
    } else {
      if (o.reg) gradient_all<scalar_t, acc_t, false, true>(rows, o.last_frame, coef.data(), gp, gq, gc);
      else gradient_all<scalar_t, acc_t, false, false>(rows, o.last_frame, coef.data(), gp, gq, gc);
    }
  });
  return {grads.pred, grads.target, grads.cond};
}

#ifdef WITH_CUDA
CudaInputs cuda_inputs(const Tensor& pred, const Tensor& target, const std::optional<Tensor>& cond,
                       const Tensor& table, const std::optional<Tensor>& dim_ws, const Options& o) {
  CudaInputs in{};
  in.pred = pred.const_data_ptr();
  in.target = target.const_data_ptr();
  for (int i = 0; i < 3; ++i) in.pred_strides[i] = pred.stride(i), in.target_strides[i] = target.stride(i);
  if (o.last_frame) {
    in.cond = cond->const_data_ptr();
    in.cond_strides[0] = cond->stride(0), in.cond_strides[1] = cond->stride(1);
  }
  in.table = table.const_data_ptr<double>();
  in.num_parts = table.size(0);
  in.dim_ws = dim_ws ? dim_ws->const_data_ptr<double>() : nullptr;
  in.B = pred.size(0), in.L = pred.size(1), in.D = pred.size(2);
  in.opts = o;
  in.dtype = cuda_dtype_of(pred.scalar_type());
  return in;
}

std::tuple<Tensor, Tensor> pva_forward_cuda(const Tensor& pred, const Tensor& target,
                                            const std::optional<Tensor>& cond_frame,
                                            const Tensor& part_table, const std::optional<Tensor>& dim_ws,
                                            std::string_view loss_type, bool use_last_frame, bool use_reg) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  const c10::cuda::CUDAGuard guard(pred.device());
  CudaInputs in = cuda_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  auto [terms, total] = empty_terms(pred, in.num_parts, o);
  Tensor workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(in))}, pred.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t status = forward_cuda(in, terms.data_ptr(), total.data_ptr(), workspace.data_ptr(),
                                          arrival_counter(pred, stream).data_ptr(), stream);
  TORCH_CHECK(status == cudaSuccess, "pva_forward (CUDA) failed: ", cudaGetErrorString(status));
  return {terms, total};
}

std::tuple<Tensor, Tensor, Tensor> pva_backward_cuda(
    const OptTensor& grad_terms, const OptTensor& grad_total, const Tensor& pred, const Tensor& target,
    const std::optional<Tensor>& cond_frame, const Tensor& part_table,
    const std::optional<Tensor>& dim_ws, std::string_view loss_type, bool use_last_frame,
    bool use_reg, std::array<bool, 3> output_mask) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  const c10::cuda::CUDAGuard guard(pred.device());
  check_grads(grad_terms, grad_total, pred, part_table.size(0), o);
  Gradients grads = empty_gradients(pred, output_mask, o);
  if (grads.pred.numel() + grads.target.numel() + grads.cond.numel() > 0) {
    CudaInputs in = cuda_inputs(pred, target, cond_frame, part_table, dim_ws, o);
    CudaGradients out{data_or_null(grad_terms), stride_or_zero(grad_terms), data_or_null(grad_total),
                      grads.pred.numel() ? grads.pred.data_ptr() : nullptr,
                      grads.target.numel() ? grads.target.data_ptr() : nullptr,
                      grads.cond.numel() ? grads.cond.data_ptr() : nullptr};
    const cudaError_t status = backward_cuda(in, out, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "pva_backward (CUDA) failed: ", cudaGetErrorString(status));
  }
  return {grads.pred, grads.target, grads.cond};
}
#endif  // WITH_CUDA

// ---------------------------------------------------------------------------------------------
// Autograd (csrc/common/autograd.h): gradients of pred, target and cond_frame.
// ---------------------------------------------------------------------------------------------

struct PVAFunction : public torch::autograd::Function<PVAFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                               const OptTensor& cond_frame, const Tensor& part_table, const OptTensor& dim_ws,
                               std::string_view loss_type, bool use_last_frame, bool use_reg) {
    const at::AutoDispatchBelowADInplaceOrView below;
    auto [terms, total] = FL_OPERATOR("pva_forward", decltype(pva_forward_cpu))
                              .call(pred, target, cond_frame, part_table, dim_ws, loss_type, use_last_frame, use_reg);
    ctx->save_for_backward({pred, target, saved_or_undefined(cond_frame), part_table, saved_or_undefined(dim_ws)});
    ctx->saved_data["loss_type"] = std::string(loss_type);
    ctx->saved_data["use_last_frame"] = use_last_frame;
    ctx->saved_data["use_reg"] = use_reg;
    ctx->set_materialize_grads(false);
    return {terms, total};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);  // one per forward argument
    if (!grads[0].defined() && !grads[1].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    // Edges: pred 0, target 1, then cond_frame 2 when given.
    const bool has_cond = saved[2].defined();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_cond && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    const std::string loss_type = ctx->saved_data["loss_type"].toStringRef();
    auto [grad_pred, grad_target, grad_cond] = call_backward(
        FL_OPERATOR("pva_backward", decltype(pva_backward_cpu)), present(grads[0]), present(grads[1]), saved[0],
        saved[1], present(saved[2]), saved[3], present(saved[4]), loss_type, ctx->saved_data["use_last_frame"].toBool(),
        ctx->saved_data["use_reg"].toBool(), mask);
    if (mask[0]) out[0] = grad_pred;
    if (mask[1]) out[1] = grad_target;
    if (mask[2]) out[2] = grad_cond;
    return out;
  }
};

std::tuple<Tensor, Tensor> pva_forward_autograd(const Tensor& pred, const Tensor& target, const OptTensor& cond_frame,
                                                const Tensor& part_table, const OptTensor& dim_ws,
                                                std::string_view loss_type, bool use_last_frame, bool use_reg) {
  refuse_grad("pva_forward", "part_table", part_table);
  refuse_grad("pva_forward", "dim_ws", dim_ws);
  const variable_list out =
      PVAFunction::apply(pred, target, cond_frame, part_table, dim_ws, loss_type, use_last_frame, use_reg);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace pva
}  // namespace fusedloss

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def("pva_forward(Tensor pred, Tensor target, Tensor? cond_frame, Tensor part_table, "
        "Tensor? dim_ws, str loss_type, bool use_last_frame, bool use_reg) -> (Tensor, Tensor)");
  m.def("pva_backward(Tensor? grad_terms, Tensor? grad_total, Tensor pred, Tensor target, Tensor? cond_frame, "
        "Tensor part_table, Tensor? dim_ws, str loss_type, bool use_last_frame, bool use_reg, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) {
  m.impl("pva_forward", &fusedloss::pva::pva_forward_autograd);
  m.impl("pva_backward", torch::CppFunction::makeFromBoxedFunction<&fusedloss::no_double_backward>());
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("pva_forward", &fusedloss::pva::pva_forward_cpu);
  m.impl("pva_backward", &fusedloss::pva::pva_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("pva_forward", &fusedloss::pva::pva_forward_cuda);
  m.impl("pva_backward", &fusedloss::pva::pva_backward_cuda);
}
#endif
