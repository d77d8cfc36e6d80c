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
#include <cstring>
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
//
// Both kernels walk column strips: the W adjacent columns of one batch element that fill one SIMD
// register (8 floats or 4 doubles in the AVX2 clone), down its L time rows. Everything a strip's
// terms need (the error window e[t..t+2], the V and A derivatives of the two rows before, the
// column sums) stays in registers, so the forward reads pred and target once and the backward reads
// them once more and writes each gradient once, with no scratch rows in between. The columns after
// the last whole strip of a block run one at a time (W = 1).
//
// A task is one column block of one batch element (in the forward, of each batch element of a
// fixed chunk in turn, so the sums do not depend on the thread count); it writes only its own
// columns. Small problems use blocks of kBlockCols columns (parallel work at small B); problems
// larger than kPrefetchBytes use whole rows and prefetch the next batch element (Prefetcher).
// The strips read acc_t rows with unit column stride: the inputs themselves when they are such,
// else a copy of the task's block (half, bfloat16, strided views); the backward writes acc_t
// gradient rows in place when the gradients are acc_t, else into a buffer that it rounds once.

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

// W lanes of acc_t in one register (a GCC/Clang vector; the portable clone runs it as two halves).
#if defined(__GNUC__) || defined(__clang__)
typedef float Floats __attribute__((vector_size(32)));
typedef double Doubles __attribute__((vector_size(32)));
#define FL_INLINE inline __attribute__((always_inline))
#else
typedef float Floats;
typedef double Doubles;
#define FL_INLINE inline
#endif
template <typename acc_t>
using Lanes = std::conditional_t<std::is_same_v<acc_t, double>, Doubles, Floats>;

// The lane helpers and strip kernels below take and return 32-byte vectors; they are always inlined,
// so no call passes one and GCC's note on the ABI of such calls without AVX does not apply (GCC
// issues it at the end of the file, so it stays off from here on).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// Lane-wise versions of pva_math.h's err and err_grad (and math.h's sign), for V = Lanes<acc_t> or
// V = acc_t (one lane).
template <typename V>
FL_INLINE V load_lanes(const void* x) {
  V v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

template <typename V>
FL_INLINE void store_lanes(void* x, const V& v) {
  std::memcpy(x, &v, sizeof v);
}

template <typename V>
FL_INLINE V abs_lanes(const V& x) {
  return x < V{} ? -x : x;  // a lane-wise select for vectors
}

template <typename V>
FL_INLINE V sign_lanes(const V& x) {
  const V one = V{} + 1;
  return (x > V{} ? one : V{}) - (x < V{} ? one : V{});
}

template <bool kL1, typename V>
FL_INLINE V err_lanes(const V& x) {
  if constexpr (kL1) return abs_lanes(x);
  else return x * x;
}

template <bool kL1, typename V>
FL_INLINE V err_grad_lanes(const V& x) {
  if constexpr (kL1) return sign_lanes(x);
  else return (V{} + 2) * x;
}

// Large problems: while a task walks the strips of one batch element, it prefetches the next one's
// slabs (contiguous [L, D] rows of pred and target, and of the gradients it will write), evenly
// over its row steps. The strips read down columns, an order the hardware prefetchers do not
// follow across pages, so without this every row would wait on memory; with it memory streams in
// address order and the next task finds its rows in the L2 cache.
struct Prefetcher {
  const char* read[2] = {nullptr, nullptr};  // pred, target
  char* write[2] = {nullptr, nullptr};       // gradients (null: not written)
  int64_t last = 0;                          // the slabs' last line
  int64_t at = 0, rate = 0;                  // lines reached, lines per step (16.16 fixed point)

  // The slabs' lines spread over `steps` row steps.
  void pace(int64_t bytes, int64_t steps) {
    last = (bytes - 1) / 64;
    rate = ((last + 1) << 16) / std::max<int64_t>(steps, 1) + 1;
  }

  FL_INLINE void step() {
    at += rate;
    const int64_t offset = std::min(at >> 16, last) * 64;
    __builtin_prefetch(read[0] + offset, 0, 2);
    __builtin_prefetch(read[1] + offset, 0, 2);
    if (write[0]) __builtin_prefetch(write[0] + offset, 1, 2);
    if (write[1]) __builtin_prefetch(write[1] + offset, 1, 2);
  }
};

// Prefetches the bytes two strips ahead of x in its row (the next strips' lines: the strips of a
// block pass over the same rows one after another).
template <typename V>
FL_INLINE void prefetch_ahead(const void* x) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + 2 * sizeof(V)), 0, 3);
}

// One row of a strip's column sums: SP += err(e), SV += err(e - e[t-1]) from row 1 (kOrder >= 1),
// SA += err(e - 2 e[t-1] + e[t-2]) from row 2 (kOrder = 2), SR += |pred|; em1, em2 move down a row.
template <int kOrder, bool kL1, bool kReg, typename V>
FL_INLINE void sums_row(const V& pt, const V& qt, V& SP, V& SV, V& SA, V& SR, V& em1, V& em2) {
  const V x = pt - qt;
  if constexpr (kReg) SR += abs_lanes(pt);
  SP += err_lanes<kL1>(x);
  if constexpr (kOrder >= 1) SV += err_lanes<kL1>(x - em1);
  if constexpr (kOrder >= 2) SA += err_lanes<kL1>(x - (V{} + 2) * em1 + em2);
  em2 = em1;
  em1 = x;
}

// Adds one batch element's column sums of one strip (the lanes of V) to S[stat * D]: row t of pred
// at p + t * ps, of target at q + t * qs; cond_frame's row at cond (null without L).
template <typename V, bool kL1, bool kReg, bool kPrefetch, typename acc_t>
FL_INLINE void sums_strip(int64_t L, const acc_t* p, int64_t ps, const acc_t* q, int64_t qs, const acc_t* cond,
                          acc_t* S, int64_t D, Prefetcher& pf) {
  V SP = load_lanes<V>(S + kP * D), SV = load_lanes<V>(S + kV * D), SA = load_lanes<V>(S + kA * D);
  V SR = kReg ? load_lanes<V>(S + kR * D) : V{};
  V em1{}, em2{};  // e of rows t-1, t-2
  sums_row<0, kL1, kReg>(load_lanes<V>(p), load_lanes<V>(q), SP, SV, SA, SR, em1, em2);
  if (L > 1) sums_row<1, kL1, kReg>(load_lanes<V>(p + ps), load_lanes<V>(q + qs), SP, SV, SA, SR, em1, em2);
  for (int64_t t = 2; t < L; ++t) {
    if constexpr (kPrefetch) pf.step();
    prefetch_ahead<V>(p + t * ps);
    prefetch_ahead<V>(q + t * qs);
    sums_row<2, kL1, kReg>(load_lanes<V>(p + t * ps), load_lanes<V>(q + t * qs), SP, SV, SA, SR, em1, em2);
  }
  store_lanes(S + kP * D, SP);
  store_lanes(S + kV * D, SV);
  store_lanes(S + kA * D, SA);
  if constexpr (kReg) store_lanes(S + kR * D, SR);
  if (cond) store_lanes(S + kL * D, load_lanes<V>(S + kL * D) + err_lanes<kL1>(load_lanes<V>(p) - load_lanes<V>(cond)));
}

// pred - target of one row of a strip.
template <typename V, typename acc_t>
FL_INLINE V error_row(const acc_t* p, const acc_t* q) {
  return load_lanes<V>(p) - load_lanes<V>(q);
}

// One row t of a strip's gradients (see gradient_strip), from the window e0..e2 = e[t..t+2] and
// gv1 = gv[t-1], ga1 = ga[t-1], ga2 = ga[t-2]; v_on: t + 1 < L, a_on: t + 2 < L. Writes d/dpred
// (without the last-frame term) and d/dtarget, then moves the window down a row (next: e[t+3]).
template <bool kL1, bool kReg, bool kTarget, typename V, typename acc_t>
FL_INLINE void gradient_row(bool v_on, bool a_on, V& e0, V& e1, V& e2, const V& next, V& gv1, V& ga1, V& ga2,
                            const V& cP, const V& cV, const V& cA, const V& cR, const acc_t* pt, acc_t* gp,
                            acc_t* gq) {
  const V two = V{} + 2;
  const V v = v_on ? err_grad_lanes<kL1>(e1 - e0) : V{};
  const V a = a_on ? err_grad_lanes<kL1>(e2 - two * e1 + e0) : V{};
  const V g = cP * err_grad_lanes<kL1>(e0) + cV * (gv1 - v) + cA * (ga2 - two * ga1 + a);
  if constexpr (kTarget) store_lanes(gq, -g);
  if constexpr (kReg) store_lanes(gp, g + cR * sign_lanes(load_lanes<V>(pt)));
  else store_lanes(gp, g);
  ga2 = ga1;
  ga1 = a;
  gv1 = v;
  e0 = e1;
  e1 = e2;
  e2 = next;
}

// The gradients of one batch element's strip (the lanes of V). With gv[t] = err'(e[t+1] - e[t]) and
// ga[t] = err'(e[t+2] - 2 e[t+1] + e[t]) (0 outside their row ranges):
//   d/de[t]     = cP err'(e[t]) + cV (gv[t-1] - gv[t]) + cA (ga[t-2] - 2 ga[t-1] + ga[t])
//   d/dpred[t]  = d/de[t] + cR sign(pred[t]) + [t == 0] cL err'(pred[0] - cond)
//   d/dtarget   = -d/de,    d/dcond = -cL err'(pred[0] - cond)
// Inputs as in sums_strip, coef[stat * D] the column coefficients; d/dpred row t at gp + t * gps,
// d/dtarget at gq + t * gqs (kTarget), d/dcond at gc (null when not wanted).
template <typename V, bool kL1, bool kReg, bool kTarget, bool kPrefetch, typename acc_t>
FL_INLINE void gradient_strip(int64_t L, const acc_t* p, int64_t ps, const acc_t* q, int64_t qs, const acc_t* cond,
                              const acc_t* coef, int64_t D, acc_t* gp, int64_t gps, acc_t* gq, int64_t gqs,
                              acc_t* gc, Prefetcher& pf) {
  const V cP = load_lanes<V>(coef + kP * D), cV = load_lanes<V>(coef + kV * D), cA = load_lanes<V>(coef + kA * D);
  const V cR = kReg ? load_lanes<V>(coef + kR * D) : V{};
  V e0 = error_row<V>(p, q);                                   // e[t]
  V e1 = L > 1 ? error_row<V>(p + ps, q + qs) : V{};            // e[t+1]
  V e2 = L > 2 ? error_row<V>(p + 2 * ps, q + 2 * qs) : V{};    // e[t+2]
  V gv1{}, ga1{}, ga2{};                                        // gv[t-1], ga[t-1], ga[t-2]
  int64_t t = 0;
  if constexpr (kL1) {
    for (; t + 3 < L; ++t) {
      if constexpr (kPrefetch) pf.step();
      prefetch_ahead<V>(p + (t + 3) * ps);
      prefetch_ahead<V>(q + (t + 3) * qs);
      gradient_row<kL1, kReg, kTarget>(true, true, e0, e1, e2, error_row<V>(p + (t + 3) * ps, q + (t + 3) * qs), gv1,
                                       ga1, ga2, cP, cV, cA, cR, p + t * ps, gp + t * gps,
                                       kTarget ? gq + t * gqs : nullptr);
    }
  } else {
    // l2, err'(x) = 2x: the same sums with the factors 2 moved into the coefficients (exact), on
    // d = e[t] - e[t-1] (gv[t-1] = 2 d) and A = e[t+2] - 2 e[t+1] + e[t] (ga[t] = 2 A).
    const V c2P = cP + cP, c2V = cV + cV, c2A = cA + cA;
    V d{}, A1{}, A2{};  // e[t] - e[t-1], A[t-1], A[t-2]
    for (; t + 3 < L; ++t) {
      if constexpr (kPrefetch) pf.step();
      prefetch_ahead<V>(p + (t + 3) * ps);
      prefetch_ahead<V>(q + (t + 3) * qs);
      const V d1 = e1 - e0, A = e2 - (e1 + e1) + e0;
      const V g = c2P * e0 + c2V * (d - d1) + c2A * (A2 - (A1 + A1) + A);
      if constexpr (kTarget) store_lanes(gq + t * gqs, -g);
      if constexpr (kReg) store_lanes(gp + t * gps, g + cR * sign_lanes(load_lanes<V>(p + t * ps)));
      else store_lanes(gp + t * gps, g);
      A2 = A1;
      A1 = A;
      d = d1;
      e0 = e1;
      e1 = e2;
      e2 = error_row<V>(p + (t + 3) * ps, q + (t + 3) * qs);
    }
    gv1 = d + d, ga1 = A1 + A1, ga2 = A2 + A2;
  }
  for (; t < L; ++t)
    gradient_row<kL1, kReg, kTarget>(t + 1 < L, t + 2 < L, e0, e1, e2, V{}, gv1, ga1, ga2, cP, cV, cA, cR, p + t * ps,
                                     gp + t * gps, kTarget ? gq + t * gqs : nullptr);
  if (cond) {  // the last-frame term joins d/dpred[0] (acc_t) before its one rounding
    const V gl = load_lanes<V>(coef + kL * D) * err_grad_lanes<kL1>(load_lanes<V>(p) - load_lanes<V>(cond));
    store_lanes(gp, load_lanes<V>(gp) + gl);
    if (gc) store_lanes(gc, -gl);
  }
}

// One task's rows: row t of pred at p + t * ps, of target at q + t * qs, cond_frame's row at cond
// (null without L), n columns.
template <typename acc_t>
struct Block {
  const acc_t *p, *q, *cond;
  int64_t ps, qs, n;
};

// A task's gradient rows: d/dpred (always written: into a buffer when not wanted), d/dtarget and
// d/dcond (null when not wanted).
template <typename acc_t>
struct GradientBlock {
  acc_t* gp;
  int64_t gps;
  acc_t* gq;
  int64_t gqs;
  acc_t* gc;
};

// Adds one batch element's column sums of a block to S[stat * D + j] (j: the block's columns);
// next: the prefetcher of the next batch element, or null.
template <typename acc_t, bool kL1, bool kReg>
FL_CPU_CLONES void block_sums(const Block<acc_t>& in, int64_t L, acc_t* S, int64_t D, const Prefetcher* next) {
  using V = Lanes<acc_t>;
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  Prefetcher pf = next ? *next : Prefetcher{};
  int64_t j = 0;
  for (; j + W <= in.n; j += W) {
    const acc_t* c = in.cond ? in.cond + j : nullptr;
    if (next) sums_strip<V, kL1, kReg, true>(L, in.p + j, in.ps, in.q + j, in.qs, c, S + j, D, pf);
    else sums_strip<V, kL1, kReg, false>(L, in.p + j, in.ps, in.q + j, in.qs, c, S + j, D, pf);
  }
  for (; j < in.n; ++j)
    sums_strip<acc_t, kL1, kReg, false>(L, in.p + j, in.ps, in.q + j, in.qs, in.cond ? in.cond + j : nullptr, S + j, D,
                                        pf);
}

// One batch element's gradients of a block (coef: the block's first column; next as in block_sums).
template <typename acc_t, bool kL1, bool kReg>
FL_CPU_CLONES void block_gradients(const Block<acc_t>& in, int64_t L, const acc_t* coef, int64_t D,
                                   const GradientBlock<acc_t>& out, const Prefetcher* next) {
  using V = Lanes<acc_t>;
  constexpr int64_t W = sizeof(V) / sizeof(acc_t);
  Prefetcher pf = next ? *next : Prefetcher{};
  int64_t j = 0;
  for (; j + W <= in.n; j += W) {
    const acc_t* c = in.cond ? in.cond + j : nullptr;
    acc_t* gq = out.gq ? out.gq + j : nullptr;
    acc_t* gc = out.gc ? out.gc + j : nullptr;
    if (gq && next)
      gradient_strip<V, kL1, kReg, true, true>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j, out.gps,
                                               gq, out.gqs, gc, pf);
    else if (gq)
      gradient_strip<V, kL1, kReg, true, false>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j,
                                                out.gps, gq, out.gqs, gc, pf);
    else if (next)
      gradient_strip<V, kL1, kReg, false, true>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j,
                                                out.gps, gq, out.gqs, gc, pf);
    else
      gradient_strip<V, kL1, kReg, false, false>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j,
                                                 out.gps, gq, out.gqs, gc, pf);
  }
  for (; j < in.n; ++j) {
    const acc_t* c = in.cond ? in.cond + j : nullptr;
    acc_t* gq = out.gq ? out.gq + j : nullptr;
    acc_t* gc = out.gc ? out.gc + j : nullptr;
    if (gq)
      gradient_strip<acc_t, kL1, kReg, true, false>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j,
                                                    out.gps, gq, out.gqs, gc, pf);
    else
      gradient_strip<acc_t, kL1, kReg, false, false>(L, in.p + j, in.ps, in.q + j, in.qs, c, coef + j, D, out.gp + j,
                                                     out.gps, gq, out.gqs, gc, pf);
  }
}

// Columns per task on small problems and for copied inputs.
constexpr int64_t kBlockCols = 64;
// Inputs (pred and target) larger than this are prefetched, a whole batch element per task.
constexpr int64_t kPrefetchBytes = int64_t(4) << 20;
// Tasks of fewer elements than this are not split between threads.
constexpr int64_t kTaskElements = 32768;

// How a problem is cut into tasks: column blocks of `cols` columns (`count` per batch element);
// `in_place`: the inputs are read where they are; `prefetch`: the tasks prefetch the next batch
// element (inputs read in place as contiguous [L, D] slabs, larger than kPrefetchBytes).
struct Blocks {
  int64_t cols, count;
  bool in_place, prefetch;
};

template <typename scalar_t, typename acc_t>
Blocks blocks_of(const Rows<scalar_t>& r) {
  const bool in_place =
      std::is_same_v<scalar_t, acc_t> && r.sp_d == 1 && r.sq_d == 1 && (r.cond == nullptr || r.sc_d == 1);
  const bool prefetch = in_place && r.sp_t == r.D && r.sq_t == r.D && r.B > 1 &&
                        2 * r.B * r.L * r.D * int64_t(sizeof(acc_t)) > kPrefetchBytes;
  const int64_t cols = prefetch ? r.D : std::min(r.D, kBlockCols);
  return {cols, (r.D + cols - 1) / cols, in_place, prefetch};
}

// x as acc_t, for data the kernels read or write in place (scalar_t is acc_t); never called otherwise.
template <typename acc_t, typename scalar_t>
acc_t* as_acc(scalar_t* x) {
  if constexpr (std::is_same_v<std::remove_const_t<scalar_t>, acc_t>) return const_cast<acc_t*>(x);
  else return nullptr;
}

// Rows [0, L) of columns [0, n) of x (element strides st, sd) as acc_t, row t at out + t * n.
template <typename acc_t, typename scalar_t>
void copy_rows(const scalar_t* x, int64_t L, int64_t st, int64_t sd, int64_t n, acc_t* out) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < n; ++j) out[t * n + j] = static_cast<acc_t>(x[t * st + j * sd]);
}

template <typename scalar_t, typename acc_t>
void round_rows(const acc_t* x, int64_t L, int64_t n, int64_t stride, scalar_t* out) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < n; ++j) out[t * stride + j] = static_cast<scalar_t>(x[t * n + j]);
}

// The block [d0, d0 + n) of batch element b: in place, or copied into buf ((2 L + 1) n values).
template <typename scalar_t, typename acc_t>
Block<acc_t> block_of(const Rows<scalar_t>& r, bool in_place, int64_t b, int64_t d0, int64_t n, acc_t* buf) {
  const scalar_t* p = r.pred + b * r.sp_b + d0 * r.sp_d;
  const scalar_t* q = r.target + b * r.sq_b + d0 * r.sq_d;
  const scalar_t* c = r.cond ? r.cond + b * r.sc_b + d0 * r.sc_d : nullptr;
  if (in_place) return {as_acc<acc_t>(p), as_acc<acc_t>(q), c ? as_acc<acc_t>(c) : nullptr, r.sp_t, r.sq_t, n};
  copy_rows(p, r.L, r.sp_t, r.sp_d, n, buf);
  copy_rows(q, r.L, r.sq_t, r.sq_d, n, buf + r.L * n);
  if (c) copy_rows(c, 1, 0, r.sc_d, n, buf + 2 * r.L * n);
  return {buf, buf + r.L * n, c ? buf + 2 * r.L * n : nullptr, n, n, n};
}

// The prefetcher of a task on batch element b (blocks of whole rows): the slabs of b + 1, to read and
// (gradients, contiguous [B, L, D], null when not written) to write, over the task's vector rows.
template <typename scalar_t, typename acc_t>
Prefetcher next_slabs(const Rows<scalar_t>& r, int64_t b, scalar_t* grad0, scalar_t* grad1) {
  constexpr int64_t W = sizeof(Lanes<acc_t>) / sizeof(acc_t);
  Prefetcher pf;
  pf.read[0] = reinterpret_cast<const char*>(r.pred + (b + 1) * r.sp_b);
  pf.read[1] = reinterpret_cast<const char*>(r.target + (b + 1) * r.sq_b);
  pf.write[0] = grad0 ? reinterpret_cast<char*>(grad0 + (b + 1) * r.L * r.D) : nullptr;
  pf.write[1] = grad1 ? reinterpret_cast<char*>(grad1 + (b + 1) * r.L * r.D) : nullptr;
  pf.pace(r.L * r.D * int64_t(sizeof(acc_t)), r.D / W * std::max<int64_t>(r.L - 3, 1));
  return pf;
}

// Fixed batch chunks (independent of the thread count) keep the sums deterministic.
int64_t batch_chunk(int64_t B) { return std::max<int64_t>(1, (B + 63) / 64); }

// The column sums of each batch chunk c (of `chunk` elements) added to partial[c][stat][d].
template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
void column_sums_chunks(const Rows<scalar_t>& r, int64_t chunk, int64_t nchunks, std::vector<acc_t>& partial) {
  const int64_t D = r.D, L = r.L;
  const Blocks blocks = blocks_of<scalar_t, acc_t>(r);
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, chunk * L * blocks.cols));
  at::parallel_for(0, nchunks * blocks.count, grain, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> buf(blocks.in_place ? 0 : (2 * L + 1) * blocks.cols);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = k / blocks.count, d0 = (k % blocks.count) * blocks.cols;
      const int64_t n = std::min(D, d0 + blocks.cols) - d0;
      for (int64_t b = c * chunk; b < std::min(r.B, (c + 1) * chunk); ++b) {
        const Block<acc_t> in = block_of(r, blocks.in_place, b, d0, n, buf.data());
        const bool prefetch = blocks.prefetch && b + 1 < r.B;
        const Prefetcher next = prefetch ? next_slabs<scalar_t, acc_t>(r, b, nullptr, nullptr) : Prefetcher{};
        block_sums<acc_t, kL1, kReg>(in, L, partial.data() + c * kNumStats * D + d0, D, prefetch ? &next : nullptr);
      }
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
    if (o.reg) column_sums_chunks<scalar_t, acc_t, true, true>(r, chunk, nchunks, partial);
    else column_sums_chunks<scalar_t, acc_t, true, false>(r, chunk, nchunks, partial);
  } else {
    if (o.reg) column_sums_chunks<scalar_t, acc_t, false, true>(r, chunk, nchunks, partial);
    else column_sums_chunks<scalar_t, acc_t, false, false>(r, chunk, nchunks, partial);
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

// The gradients (each null when not wanted) of every batch element, one task per block.
template <typename scalar_t, typename acc_t, bool kL1, bool kReg>
void gradient_all(const Rows<scalar_t>& r, const acc_t* coef, scalar_t* grad_pred, scalar_t* grad_target,
                  scalar_t* grad_cond) {
  constexpr bool kOutInPlace = std::is_same_v<scalar_t, acc_t>;  // the gradients: contiguous acc_t
  const int64_t D = r.D, L = r.L;
  const Blocks blocks = blocks_of<scalar_t, acc_t>(r);
  const bool pred_in_place = kOutInPlace && grad_pred != nullptr;
  // Per-thread buffer: copied inputs, then acc_t rows of d/dpred, d/dtarget and d/dcond where needed.
  const int64_t in_size = blocks.in_place ? 0 : (2 * L + 1) * blocks.cols;
  const int64_t gp_size = pred_in_place ? 0 : L * blocks.cols;
  const int64_t gq_size = grad_target && !kOutInPlace ? L * blocks.cols : 0;
  const int64_t gc_size = grad_cond && !kOutInPlace ? blocks.cols : 0;
  const int64_t grain = std::max<int64_t>(1, kTaskElements / std::max<int64_t>(1, L * blocks.cols));
  at::parallel_for(0, r.B * blocks.count, grain, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> buf(in_size + gp_size + gq_size + gc_size);
    acc_t* gp_buf = buf.data() + in_size;
    acc_t* gq_buf = gp_buf + gp_size;
    acc_t* gc_buf = gq_buf + gq_size;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / blocks.count, d0 = (k % blocks.count) * blocks.cols;
      const int64_t n = std::min(D, d0 + blocks.cols) - d0;
      scalar_t* gp = grad_pred ? grad_pred + b * L * D + d0 : nullptr;
      scalar_t* gq = grad_target ? grad_target + b * L * D + d0 : nullptr;
      scalar_t* gc = grad_cond ? grad_cond + b * D + d0 : nullptr;
      GradientBlock<acc_t> out{pred_in_place ? as_acc<acc_t>(gp) : gp_buf, pred_in_place ? D : n,
                               gq ? (kOutInPlace ? as_acc<acc_t>(gq) : gq_buf) : nullptr, kOutInPlace ? D : n,
                               gc ? (kOutInPlace ? as_acc<acc_t>(gc) : gc_buf) : nullptr};
      const Block<acc_t> in = block_of(r, blocks.in_place, b, d0, n, buf.data());
      const bool prefetch = blocks.prefetch && b + 1 < r.B;
      const Prefetcher next = prefetch ? next_slabs<scalar_t, acc_t>(r, b, grad_pred, grad_target) : Prefetcher{};
      block_gradients<acc_t, kL1, kReg>(in, L, coef + d0, D, out, prefetch ? &next : nullptr);
      if constexpr (!kOutInPlace) {
        if (gp) round_rows(out.gp, L, n, D, gp);
        if (gq) round_rows(out.gq, L, n, D, gq);
        if (gc) round_rows(out.gc, 1, n, D, gc);
      }
    }
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
      if (o.reg) gradient_all<scalar_t, acc_t, true, true>(rows, coef.data(), gp, gq, gc);
      else gradient_all<scalar_t, acc_t, true, false>(rows, coef.data(), gp, gq, gc);
    } else {
      if (o.reg) gradient_all<scalar_t, acc_t, false, true>(rows, coef.data(), gp, gq, gc);
      else gradient_all<scalar_t, acc_t, false, false>(rows, coef.data(), gp, gq, gc);
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
