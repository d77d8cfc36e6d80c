// PVA loss: operator schemas, C++ CPU kernels, and the CUDA dispatch (kernels in cuda/pva.cu).
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

#include "pva_math.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/pva_cuda.h"
#endif

namespace fusedloss {
namespace pva {
namespace {

using at::Tensor;

Options parse_options(std::string_view loss_type, bool use_last_frame, bool use_reg) {
  TORCH_CHECK(loss_type == "l2" || loss_type == "l1",
              "pva: loss_type must be \"l2\" or \"l1\", got \"", std::string(loss_type), "\"");
  return Options{loss_type == "l1", use_last_frame, use_reg};
}

// Boundary checks; fusedloss.functional validates user input with friendlier messages first.
void check_inputs(const Tensor& pred, const Tensor& target, const std::optional<Tensor>& cond,
                  const Tensor& table, const std::optional<Tensor>& dim_ws, const Options& o) {
  TORCH_CHECK(pred.dim() == 3, "pva: pred must be [B, L, D], got ", pred.sizes());
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

// The part spans must lie inside [0, D]; only checkable here for a table in host memory.
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

// ----------------------------------------------------------------------------------------------
// CPU kernels
// ----------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Rows {
  const scalar_t* pred;
  const scalar_t* target;
  const scalar_t* cond;  // null without last-frame terms
  int64_t B, L, D;
  int64_t pb, pt, pd, qb, qt, qd, cb, cd;  // strides of pred, target, cond_frame
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
  r.pb = pred.stride(0), r.pt = pred.stride(1), r.pd = pred.stride(2);
  r.qb = target.stride(0), r.qt = target.stride(1), r.qd = target.stride(2);
  if (use_cond) {
    r.cond = cond->const_data_ptr<scalar_t>();
    r.cb = cond->stride(0), r.cd = cond->stride(1);
  }
  return r;
}

// e_row[d] = pred[b, t, d] - target[b, t, d] in acc_t (the one read of the row); with REG also
// absp[d] += |pred[b, t, d]|.
template <typename scalar_t, typename acc_t>
void load_error_row(const Rows<scalar_t>& r, int64_t b, int64_t t, acc_t* e_row, acc_t* absp) {
  const scalar_t* p = r.pred + b * r.pb + t * r.pt;
  const scalar_t* q = r.target + b * r.qb + t * r.qt;
  if (r.pd == 1 && r.qd == 1) {  // contiguous rows: a loop the compiler vectorises
    if (absp) {
      for (int64_t d = 0; d < r.D; ++d) {
        const acc_t pv = static_cast<acc_t>(p[d]);
        e_row[d] = pv - static_cast<acc_t>(q[d]);
        absp[d] += std::abs(pv);
      }
    } else {
      for (int64_t d = 0; d < r.D; ++d) e_row[d] = static_cast<acc_t>(p[d]) - static_cast<acc_t>(q[d]);
    }
  } else {
    for (int64_t d = 0; d < r.D; ++d) {
      const acc_t pv = static_cast<acc_t>(p[d * r.pd]);
      e_row[d] = pv - static_cast<acc_t>(q[d * r.qd]);
      if (absp) absp[d] += std::abs(pv);
    }
  }
}

// Column sums S[stat][d] over batch rows [b0, b1) (S zeroed by the caller).
template <typename scalar_t, typename acc_t, bool kL1>
void column_sums(const Rows<scalar_t>& r, const Options& o, int64_t b0, int64_t b1, acc_t* S) {
  const int64_t D = r.D;
  acc_t* SP = S + kP * D;
  acc_t* SV = S + kV * D;
  acc_t* SA = S + kA * D;
  acc_t* SL = S + kL * D;
  acc_t* SR = o.reg ? S + kR * D : nullptr;
  std::vector<acc_t> ring(3 * D);  // e at rows t, t-1, t-2
  for (int64_t b = b0; b < b1; ++b) {
    if (o.last_frame) {
      const scalar_t* p = r.pred + b * r.pb;
      const scalar_t* c = r.cond + b * r.cb;
      for (int64_t d = 0; d < D; ++d)
        SL[d] += err(static_cast<acc_t>(p[d * r.pd]) - static_cast<acc_t>(c[d * r.cd]), kL1);
    }
    for (int64_t t = 0; t < r.L; ++t) {
      acc_t* e0 = ring.data() + (t % 3) * D;
      const acc_t* e1 = ring.data() + ((t + 2) % 3) * D;  // row t-1
      const acc_t* e2 = ring.data() + ((t + 1) % 3) * D;  // row t-2
      load_error_row<scalar_t, acc_t>(r, b, t, e0, SR);
      if (t >= 2) {
        for (int64_t d = 0; d < D; ++d) {
          const acc_t x = e0[d], v = x - e1[d];
          SP[d] += err(x, kL1);
          SV[d] += err(v, kL1);
          SA[d] += err(v - (e1[d] - e2[d]), kL1);
        }
      } else if (t == 1) {
        for (int64_t d = 0; d < D; ++d) {
          SP[d] += err(e0[d], kL1);
          SV[d] += err(e0[d] - e1[d], kL1);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) SP[d] += err(e0[d], kL1);
      }
    }
  }
}

// Fixed batch chunks (independent of the thread count) keep the sums deterministic.
int64_t batch_chunk(int64_t B) { return std::max<int64_t>(1, (B + 63) / 64); }

template <typename scalar_t>
void forward_cpu(const Rows<scalar_t>& r, const Options& o, const double* table, int64_t P,
                 const double* dim_ws, Tensor& terms, Tensor& total) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t D = r.D, chunk = batch_chunk(r.B);
  const int64_t nchunks = std::max<int64_t>(1, (r.B + chunk - 1) / chunk);  // one (empty) for B = 0
  std::vector<acc_t> partial(nchunks * kNumStats * D, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* S = partial.data() + c * kNumStats * D;
      const int64_t b0 = c * chunk, b1 = std::min(r.B, b0 + chunk);
      if (o.l1) column_sums<scalar_t, acc_t, true>(r, o, b0, b1, S);
      else column_sums<scalar_t, acc_t, false>(r, o, b0, b1, S);
    }
  });
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

// coef[stat][d] = sum over parts containing d of g(part, stat) * factor (* dim_ws[d] unless R):
// the gradient of the loss with respect to one element's statistic.
template <typename acc_t>
std::vector<acc_t> column_coefficients(const Options& o, const double* table, int64_t P,
                                       const double* dim_ws, const acc_t* grad_terms,
                                       int64_t g_stride, int64_t B, int64_t L, int64_t D) {
  std::vector<acc_t> coef(kNumStats * D, acc_t(0));
  const int K = terms_per_part(o);
  for (int64_t p = 0; p < P; ++p) {
    const double* row = table + p * kTableCols;
    int64_t s, e;
    part_span(row, D, &s, &e);
    for (int k = 0; k < K; ++k) {
      const int stat = term_stat(k, o);
      const acc_t c = grad_terms[(p * K + k) * g_stride] * term_factor<acc_t>(row, stat, B, L, e - s);
      const bool dim_weighted = dim_ws != nullptr && stat != kR;
      for (int64_t d = s; d < e; ++d)
        coef[stat * D + d] += dim_weighted ? c * static_cast<acc_t>(dim_ws[d]) : c;
    }
  }
  return coef;
}

// Gradients for batch rows [b0, b1). With gv[t] = err'(e[t+1] - e[t]) and
// ga[t] = err'(e[t+2] - 2 e[t+1] + e[t]) (0 outside their row ranges):
//   d/de[t]     = cP err'(e[t]) + cV (gv[t-1] - gv[t]) + cA (ga[t-2] - 2 ga[t-1] + ga[t])
//   d/dpred[t]  = d/de[t] + cR sign(pred[t]) + [t == 0] cL err'(pred[0] - cond)
//   d/dtarget   = -d/de,    d/dcond = -cL err'(pred[0] - cond)
template <typename scalar_t, typename acc_t, bool kL1>
void gradient_rows(const Rows<scalar_t>& r, const Options& o, const acc_t* coef, int64_t b0,
                   int64_t b1, scalar_t* grad_pred, scalar_t* grad_target, scalar_t* grad_cond) {
  const int64_t D = r.D, L = r.L;
  const acc_t* cP = coef + kP * D;
  const acc_t* cV = coef + kV * D;
  const acc_t* cA = coef + kA * D;
  const acc_t* cL = coef + kL * D;
  const acc_t* cR = coef + kR * D;
  std::vector<acc_t> e_ring(3 * D), gv_ring(2 * D), ga_ring(3 * D), last_row(D);
  for (int64_t b = b0; b < b1; ++b) {
    load_error_row<scalar_t, acc_t>(r, b, 0, e_ring.data(), nullptr);
    if (L > 1) load_error_row<scalar_t, acc_t>(r, b, 1, e_ring.data() + D, nullptr);
    std::fill(gv_ring.begin() + D, gv_ring.end(), acc_t(0));      // gv[-1]
    std::fill(ga_ring.begin() + D, ga_ring.end(), acc_t(0));      // ga[-2], ga[-1]
    for (int64_t t = 0; t < L; ++t) {
      if (t + 2 < L) load_error_row<scalar_t, acc_t>(r, b, t + 2, e_ring.data() + ((t + 2) % 3) * D, nullptr);
      const acc_t* e0 = e_ring.data() + (t % 3) * D;
      const acc_t* e1 = e_ring.data() + ((t + 1) % 3) * D;
      const acc_t* e2 = e_ring.data() + ((t + 2) % 3) * D;
      acc_t* gv = gv_ring.data() + (t % 2) * D;
      const acc_t* gv_m1 = gv_ring.data() + ((t + 1) % 2) * D;
      acc_t* ga = ga_ring.data() + (t % 3) * D;
      const acc_t* ga_m1 = ga_ring.data() + ((t + 2) % 3) * D;
      const acc_t* ga_m2 = ga_ring.data() + ((t + 1) % 3) * D;
      const bool has_v = t + 1 < L, has_a = t + 2 < L;
      for (int64_t d = 0; d < D; ++d) {
        gv[d] = has_v ? err_grad(e1[d] - e0[d], kL1) : acc_t(0);
        ga[d] = has_a ? err_grad(e2[d] - acc_t(2) * e1[d] + e0[d], kL1) : acc_t(0);
      }
      // The last-frame term touches row 0 only: its gradient joins d/dpred before the one rounding.
      const acc_t* g_last = nullptr;
      if (t == 0 && o.last_frame) {
        const scalar_t* p0 = r.pred + b * r.pb;
        const scalar_t* c = r.cond + b * r.cb;
        for (int64_t d = 0; d < D; ++d)
          last_row[d] = cL[d] * err_grad(static_cast<acc_t>(p0[d * r.pd]) - static_cast<acc_t>(c[d * r.cd]), kL1);
        if (grad_cond)
          for (int64_t d = 0; d < D; ++d) grad_cond[b * D + d] = static_cast<scalar_t>(-last_row[d]);
        g_last = last_row.data();
      }
      scalar_t* gp = grad_pred ? grad_pred + (b * L + t) * D : nullptr;
      scalar_t* gq = grad_target ? grad_target + (b * L + t) * D : nullptr;
      const scalar_t* p = r.pred + b * r.pb + t * r.pt;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t ge = cP[d] * err_grad(e0[d], kL1) + cV[d] * (gv_m1[d] - gv[d]) +
                         cA[d] * (ga_m2[d] - acc_t(2) * ga_m1[d] + ga[d]);
        if (gq) gq[d] = static_cast<scalar_t>(-ge);
        if (gp) {
          acc_t g = ge;
          if (o.reg) g += cR[d] * sign(static_cast<acc_t>(p[d * r.pd]));
          if (g_last) g += g_last[d];
          gp[d] = static_cast<scalar_t>(g);
        }
      }
    }
  }
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
  const auto acc = acc_type_of(pred.scalar_type());
  Tensor terms = at::empty({P * terms_per_part(o)}, pred.options().dtype(acc));
  Tensor total = at::empty({}, pred.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pva_forward_cpu", [&] {
    const auto rows = make_rows<scalar_t>(pred, target, cond_frame, o.last_frame);
    forward_cpu<scalar_t>(rows, o, part_table.const_data_ptr<double>(), P,
                          dim_ws ? dim_ws->const_data_ptr<double>() : nullptr, terms, total);
  });
  return {terms, total};
}

std::tuple<Tensor, Tensor, Tensor> pva_backward_cpu(
    const Tensor& grad_terms, const Tensor& pred, const Tensor& target,
    const std::optional<Tensor>& cond_frame, const Tensor& part_table,
    const std::optional<Tensor>& dim_ws, std::string_view loss_type, bool use_last_frame,
    bool use_reg, std::array<bool, 3> output_mask) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  check_spans_cpu(part_table, pred.size(2));
  const int64_t P = part_table.size(0), B = pred.size(0), L = pred.size(1), D = pred.size(2);
  const auto acc = acc_type_of(pred.scalar_type());
  TORCH_CHECK(grad_terms.dim() == 1 && grad_terms.size(0) == P * terms_per_part(o) &&
                  grad_terms.scalar_type() == acc && grad_terms.device() == pred.device(),
              "pva: grad_terms must be a [P*K] tensor of the terms' dtype");
  const bool need_cond = output_mask[2] && o.last_frame;
  Tensor grad_pred = output_mask[0] ? at::empty({B, L, D}, pred.options()) : at::empty({0}, pred.options());
  Tensor grad_target = output_mask[1] ? at::empty({B, L, D}, pred.options()) : at::empty({0}, pred.options());
  Tensor grad_cond = need_cond ? at::empty({B, D}, pred.options()) : at::empty({0}, pred.options());
  if (!output_mask[0] && !output_mask[1] && !need_cond) return {grad_pred, grad_target, grad_cond};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pva_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto rows = make_rows<scalar_t>(pred, target, cond_frame, o.last_frame);
    const std::vector<acc_t> coef = column_coefficients<acc_t>(
        o, part_table.const_data_ptr<double>(), P, dim_ws ? dim_ws->const_data_ptr<double>() : nullptr,
        grad_terms.const_data_ptr<acc_t>(), grad_terms.stride(0), B, L, D);
    scalar_t* gp = output_mask[0] ? grad_pred.data_ptr<scalar_t>() : nullptr;
    scalar_t* gq = output_mask[1] ? grad_target.data_ptr<scalar_t>() : nullptr;
    scalar_t* gc = need_cond ? grad_cond.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      if (o.l1) gradient_rows<scalar_t, acc_t, true>(rows, o, coef.data(), b0, b1, gp, gq, gc);
      else gradient_rows<scalar_t, acc_t, false>(rows, o, coef.data(), b0, b1, gp, gq, gc);
    });
  });
  return {grad_pred, grad_target, grad_cond};
}

#ifdef WITH_CUDA
DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "pva: unsupported dtype ", t);
  }
}

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
  in.dtype = cuda_dtype(pred.scalar_type());
  return in;
}

std::tuple<Tensor, Tensor> pva_forward_cuda(const Tensor& pred, const Tensor& target,
                                            const std::optional<Tensor>& cond_frame,
                                            const Tensor& part_table, const std::optional<Tensor>& dim_ws,
                                            std::string_view loss_type, bool use_last_frame, bool use_reg) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = acc_type_of(pred.scalar_type());
  CudaInputs in = cuda_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  Tensor terms = at::empty({in.num_parts * terms_per_part(o)}, pred.options().dtype(acc));
  Tensor total = at::empty({}, pred.options().dtype(acc));
  Tensor workspace = at::empty({static_cast<int64_t>(forward_workspace_bytes(in))}, pred.options().dtype(at::kByte));
  const cudaError_t status = forward_cuda(in, terms.data_ptr(), total.data_ptr(), workspace.data_ptr(),
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "pva_forward (CUDA) failed: ", cudaGetErrorString(status));
  return {terms, total};
}

std::tuple<Tensor, Tensor, Tensor> pva_backward_cuda(
    const Tensor& grad_terms, const Tensor& pred, const Tensor& target,
    const std::optional<Tensor>& cond_frame, const Tensor& part_table,
    const std::optional<Tensor>& dim_ws, std::string_view loss_type, bool use_last_frame,
    bool use_reg, std::array<bool, 3> output_mask) {
  const Options o = parse_options(loss_type, use_last_frame, use_reg);
  check_inputs(pred, target, cond_frame, part_table, dim_ws, o);
  const c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0), L = pred.size(1), D = pred.size(2);
  TORCH_CHECK(grad_terms.dim() == 1 && grad_terms.size(0) == part_table.size(0) * terms_per_part(o) &&
                  grad_terms.scalar_type() == acc_type_of(pred.scalar_type()) &&
                  grad_terms.device() == pred.device(),
              "pva: grad_terms must be a [P*K] tensor of the terms' dtype");
  const bool need_cond = output_mask[2] && o.last_frame;
  Tensor grad_pred = output_mask[0] ? at::empty({B, L, D}, pred.options()) : at::empty({0}, pred.options());
  Tensor grad_target = output_mask[1] ? at::empty({B, L, D}, pred.options()) : at::empty({0}, pred.options());
  Tensor grad_cond = need_cond ? at::empty({B, D}, pred.options()) : at::empty({0}, pred.options());
  if (output_mask[0] || output_mask[1] || need_cond) {
    CudaInputs in = cuda_inputs(pred, target, cond_frame, part_table, dim_ws, o);
    CudaGradients out{grad_terms.const_data_ptr(), grad_terms.stride(0),
                      output_mask[0] ? grad_pred.data_ptr() : nullptr,
                      output_mask[1] ? grad_target.data_ptr() : nullptr,
                      need_cond ? grad_cond.data_ptr() : nullptr};
    const cudaError_t status = backward_cuda(in, out, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "pva_backward (CUDA) failed: ", cudaGetErrorString(status));
  }
  return {grad_pred, grad_target, grad_cond};
}
#endif  // WITH_CUDA

}  // namespace
}  // namespace pva
}  // namespace fusedloss

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def("pva_forward(Tensor pred, Tensor target, Tensor? cond_frame, Tensor part_table, "
        "Tensor? dim_ws, str loss_type, bool use_last_frame, bool use_reg) -> (Tensor, Tensor)");
  m.def("pva_backward(Tensor grad_terms, Tensor pred, Tensor target, Tensor? cond_frame, "
        "Tensor part_table, Tensor? dim_ws, str loss_type, bool use_last_frame, bool use_reg, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
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
