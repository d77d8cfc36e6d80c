// simt_kernels: the host launch functions of csrc/<family>/<family>_cuda.cu, running on the CPU (simt_cuda.h),
// for Python tests. Each family's structs (CudaInputs, CudaGradients, ...) are bound field by
// field with the names they have in C++, so Python fills exactly what the torch dispatch code
// (csrc/<family>/<family>.cpp, cuda_inputs) fills; pointers are passed as addresses (tensor.data_ptr()).
// Every call runs on the null stream and returns the cudaError_t as an int.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>

#include <cstdint>
#include <type_traits>

#include "blendshape/blendshape_cuda.h"
#include "pva/pva_cuda.h"
#include "score/score_cuda.h"
#ifdef SIMT_TRACE
#include "trace.h"
#endif

namespace py = pybind11;
using namespace fusedloss;

namespace {

template <typename T>
void assign(T& dst, py::handle src, const char* name) {
  if constexpr (std::is_array_v<T>) {
    const auto seq = py::reinterpret_borrow<py::sequence>(src);
    if (seq.size() != std::extent_v<T>)
      throw py::value_error(std::string(name) + ": expected " + std::to_string(std::extent_v<T>) + " values, got " +
                            std::to_string(seq.size()));
    for (size_t i = 0; i < std::extent_v<T>; ++i) assign(dst[i], seq[i], name);
  } else {
    dst = src.cast<T>();
  }
}

template <typename T>
py::object as_python(const T& value) {
  if constexpr (std::is_array_v<T>) {
    py::list out;
    for (const auto& v : value) out.append(as_python(v));
    return out;
  } else {
    return py::cast(value);
  }
}

// A struct field as a Python attribute: pointers as int addresses, arrays as (nested) lists.
template <typename C, typename F>
void field(py::class_<C>& cls, const char* name, F C::*member) {
  if constexpr (std::is_pointer_v<F>) {
    cls.def_property(
        name, [member](const C& c) { return reinterpret_cast<uintptr_t>(c.*member); },
        [member](C& c, uintptr_t address) { c.*member = reinterpret_cast<F>(address); });
  } else if constexpr (std::is_array_v<F>) {
    cls.def_property(
        name, [member](const C& c) { return as_python(c.*member); },
        [member, name](C& c, py::handle v) { assign(c.*member, v, name); });
  } else {
    cls.def_readwrite(name, member);
  }
}

template <typename C>
py::class_<C> plain_struct(py::module_& m, const char* name) {
  return py::class_<C>(m, name).def(py::init([] { return C{}; }));
}

#define FIELD(cls, Struct, name) field(cls, #name, &Struct::name)

template <typename T>
T* address(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

void bind_pva(py::module_ m) {
  using namespace fusedloss::pva;
  auto options = plain_struct<Options>(m, "Options");
  FIELD(options, Options, l1);
  FIELD(options, Options, last_frame);
  FIELD(options, Options, reg);
  auto in = plain_struct<CudaInputs>(m, "CudaInputs");
  FIELD(in, CudaInputs, pred);
  FIELD(in, CudaInputs, target);
  FIELD(in, CudaInputs, cond);
  FIELD(in, CudaInputs, pred_strides);
  FIELD(in, CudaInputs, target_strides);
  FIELD(in, CudaInputs, cond_strides);
  FIELD(in, CudaInputs, table);
  FIELD(in, CudaInputs, num_parts);
  FIELD(in, CudaInputs, dim_ws);
  FIELD(in, CudaInputs, B);
  FIELD(in, CudaInputs, L);
  FIELD(in, CudaInputs, D);
  FIELD(in, CudaInputs, opts);
  FIELD(in, CudaInputs, dtype);
  auto grads = plain_struct<CudaGradients>(m, "CudaGradients");
  FIELD(grads, CudaGradients, grad_terms);
  FIELD(grads, CudaGradients, grad_terms_stride);
  FIELD(grads, CudaGradients, grad_total);
  FIELD(grads, CudaGradients, grad_pred);
  FIELD(grads, CudaGradients, grad_target);
  FIELD(grads, CudaGradients, grad_cond);
  m.def("forward_workspace_bytes", &forward_workspace_bytes);
  m.def("forward_cuda", [](const CudaInputs& in, uintptr_t terms, uintptr_t total, uintptr_t workspace,
                           uintptr_t counter) {
    return int(forward_cuda(in, address<void>(terms), address<void>(total), address<void>(workspace),
                            address<void>(counter), nullptr));
  });
  m.def("backward_cuda", [](const CudaInputs& in, const CudaGradients& out) { return int(backward_cuda(in, out, nullptr)); });
}

void bind_blendshape(py::module_ m) {
  using namespace fusedloss::blendshape;
  auto problem = plain_struct<Problem>(m, "Problem");
  FIELD(problem, Problem, B);
  FIELD(problem, Problem, T);
  FIELD(problem, Problem, K);
  FIELD(problem, Problem, J);
  FIELD(problem, Problem, term_mask);
  FIELD(problem, Problem, group_form);
  auto in = plain_struct<CudaInputs>(m, "CudaInputs");
  FIELD(in, CudaInputs, pred);
  FIELD(in, CudaInputs, target);
  FIELD(in, CudaInputs, raw_pred);
  FIELD(in, CudaInputs, prev_pred);
  FIELD(in, CudaInputs, strides);
  FIELD(in, CudaInputs, settings);
  FIELD(in, CudaInputs, group_coef);
  FIELD(in, CudaInputs, group_len);
  FIELD(in, CudaInputs, gram);
  FIELD(in, CudaInputs, problem);
  FIELD(in, CudaInputs, dtype);
  auto grads = plain_struct<CudaGradients>(m, "CudaGradients");
  FIELD(grads, CudaGradients, grad_terms);
  FIELD(grads, CudaGradients, grad_terms_stride);
  FIELD(grads, CudaGradients, grad_total);
  FIELD(grads, CudaGradients, col_stats);
  FIELD(grads, CudaGradients, grad_pred);
  FIELD(grads, CudaGradients, grad_target);
  FIELD(grads, CudaGradients, grad_raw);
  m.def("forward_workspace_bytes", &forward_workspace_bytes);
  m.def("forward_cuda", [](const CudaInputs& in, uintptr_t terms, uintptr_t total, uintptr_t col_stats,
                           uintptr_t workspace, uintptr_t counter) {
    return int(forward_cuda(in, address<void>(terms), address<void>(total), address<void>(col_stats),
                            address<void>(workspace), address<void>(counter), nullptr));
  });
  m.def("backward_cuda", [](const CudaInputs& in, const CudaGradients& out) { return int(backward_cuda(in, out, nullptr)); });
}

void bind_score(py::module_ m) {
  using namespace fusedloss::score;
  auto problem = plain_struct<Problem>(m, "Problem");
  FIELD(problem, Problem, B);
  FIELD(problem, Problem, term_mask);
  FIELD(problem, Problem, smooth_l1);
  FIELD(problem, Problem, ranking_sum);
  auto in = plain_struct<CudaInputs>(m, "CudaInputs");
  FIELD(in, CudaInputs, scores);
  FIELD(in, CudaInputs, scores_stride);
  FIELD(in, CudaInputs, labels);
  FIELD(in, CudaInputs, labels_stride);
  FIELD(in, CudaInputs, labels_dtype);
  FIELD(in, CudaInputs, logits);
  FIELD(in, CudaInputs, logits_strides);
  FIELD(in, CudaInputs, settings);
  FIELD(in, CudaInputs, problem);
  FIELD(in, CudaInputs, dtype);
  auto outs = plain_struct<CudaOutputs>(m, "CudaOutputs");
  FIELD(outs, CudaOutputs, terms);
  FIELD(outs, CudaOutputs, total);
  FIELD(outs, CudaOutputs, counts);
  FIELD(outs, CudaOutputs, rank_scale);
  FIELD(outs, CudaOutputs, status);
  auto grads = plain_struct<CudaGradients>(m, "CudaGradients");
  FIELD(grads, CudaGradients, grad_terms);
  FIELD(grads, CudaGradients, grad_terms_stride);
  FIELD(grads, CudaGradients, grad_total);
  FIELD(grads, CudaGradients, counts);
  FIELD(grads, CudaGradients, rank_scale);
  FIELD(grads, CudaGradients, grad_scores);
  FIELD(grads, CudaGradients, grad_logits);
  m.def("forward_workspace_bytes", &forward_workspace_bytes);
  m.def("forward_cuda", [](const CudaInputs& in, const CudaOutputs& out, uintptr_t workspace, uintptr_t counter) {
    return int(forward_cuda(in, out, address<void>(workspace), address<void>(counter), nullptr));
  });
  m.def("backward_cuda", [](const CudaInputs& in, const CudaGradients& out) { return int(backward_cuda(in, out, nullptr)); });
}

}  // namespace

PYBIND11_MODULE(simt_kernels, m) {
  m.doc() = "fusedloss's CUDA kernels on CPU threads (tests/simt)";
  py::enum_<cuda::DType>(m, "DType")
      .value("kFloat32", cuda::DType::kFloat32)
      .value("kFloat64", cuda::DType::kFloat64)
      .value("kFloat16", cuda::DType::kFloat16)
      .value("kBFloat16", cuda::DType::kBFloat16);
  bind_pva(m.def_submodule("pva"));
  bind_blendshape(m.def_submodule("blendshape"));
  bind_score(m.def_submodule("score"));

  // The emulated device.
  m.def("set_seed", &simt::set_seed, "block order of the following launches");
  m.def("set_blocks_in_flight", &simt::set_blocks_in_flight);
  m.def("set_sm_count", &simt::set_sm_count, "SMs of the device the following launches size their grids for");
  m.def("clear_launches", &simt::clear_launches);
  m.def("launches", [] {
    py::list out;
    for (const auto& r : simt::launches())
      if (r.library == nullptr)
        out.append(py::make_tuple(py::make_tuple(r.grid.x, r.grid.y, r.grid.z), py::make_tuple(r.block.x, r.block.y, r.block.z)));
    return out;
  }, "(grid, block) of every kernel launch since clear_launches()");
  m.def("launch_records", [] {
    py::list out;
    for (const auto& r : simt::launches()) {
      py::dict d;
      d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
      d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
      d["kernel"] = reinterpret_cast<uintptr_t>(r.kernel);
      d["library"] = r.library ? py::cast(std::string(r.library)) : py::none();
      d["keys"] = r.keys;
      d["key_bytes"] = r.key_bytes;
      out.append(d);
    }
    return out;
  }, "every launch since clear_launches(), library calls (tests/simt/cub) included: grid, block, kernel "
     "(address), library, keys, key_bytes");
  m.def("set_dry_run", &simt::set_dry_run, "record the following launches without running them");
#ifdef SIMT_TRACE
  // The global-memory accesses of the kernels (trace.h); addresses of the functions for naming them.
  m.def("trace_begin", &simt_trace::begin, "record accesses to these (address, bytes) buffers");
  m.def("trace_end", [] { return py::bytes(simt_trace::end()); }, "stop; the events (trace.h Event) as bytes");
  m.def("trace_clear", &simt_trace::clear);
  m.def("module_base", [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&simt_trace::begin), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }, "load address of this module (sites and kernels are given relative to it)");
#endif
}
