// The autograd glue of every family's operators, in C++ (registered at the Autograd key, as
// torchvision registers its ops), so an eager training step runs no Python between the forward
// op call and the backward kernel.
//
// Each family f has two operators (csrc/f/f.cpp):
//   f_forward(*inputs)  -> (terms [n], total [], *aux)
//   f_backward(grad_terms?, grad_total?, *aux, *inputs, output_mask) -> one gradient per input
//                          that has one (an empty tensor where output_mask is false)
// ``total`` is a fixed linear combination of the terms computed by the forward kernel, so
// d(loss)/d(term i) = grad_terms[i] + weight_i * grad_total, which the backward kernel forms
// itself. A gradient that reaches no output is absent (None) and the kernels read it as 0, so
// backpropagating only ``total`` (the common case) launches nothing but the backward kernel.
// ``aux`` are non-differentiable statistics of the forward that the backward reuses.
//
// The family's torch::autograd::Function saves every tensor through save_for_backward only (so
// saved-tensor hooks, activation offloading and checkpointing see all of them) and the other
// arguments in saved_data. Its forward calls f_forward below autograd; its backward calls
// f_backward, below autograd too unless grad mode is on (backward(create_graph=True)), where the
// backward operator's own Autograd kernel (NoDoubleBackward) marks the gradients as having no
// gradient of their own.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedloss {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The operator "fusedloss::<name>" with C++ signature Sig, looked up once per call site.
#define FL_OPERATOR(name, Sig)                                                                           \
  ([]() -> const c10::TypedOperatorHandle<Sig>& {                                                       \
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("fusedloss::" name, "").typed<Sig>(); \
    return handle;                                                                                        \
  }())

// An optional tensor as saved (undefined when absent) and back.
inline at::Tensor saved_or_undefined(const std::optional<at::Tensor>& x) { return x.has_value() ? *x : at::Tensor(); }
inline std::optional<at::Tensor> present(const at::Tensor& x) {
  return x.defined() ? std::optional<at::Tensor>(x) : std::nullopt;
}

// A missing gradient (std::nullopt) as the kernels read it: a null pointer, meaning 0.
inline const void* data_or_null(const std::optional<at::Tensor>& x) { return x ? x->const_data_ptr() : nullptr; }
inline int64_t stride_or_zero(const std::optional<at::Tensor>& x) { return x ? x->stride(0) : 0; }
template <typename acc_t>
acc_t value_or_zero(const std::optional<at::Tensor>& x) {
  return x ? *x->const_data_ptr<acc_t>() : acc_t(0);
}

// An argument the operator has no gradient for (a table) must not require one: raising beats
// silently dropping its gradient. (Targets and labels are constants by the losses' contract and
// are not checked.)
inline void refuse_grad(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !x.defined() || !x.requires_grad(), op, ": ", name,
              " requires grad, but the fused backends have no gradient for it; detach it or use backend='reference'");
}
inline void refuse_grad(const char* op, const char* name, const std::optional<at::Tensor>& x) {
  if (x) refuse_grad(op, name, *x);
}

// Calls a backward operator from a Function's backward: below autograd (no dispatch to the
// Autograd key) unless the caller asked for a differentiable backward (create_graph=True).
template <typename Handle, typename... Args>
auto call_backward(const Handle& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// The Autograd kernel of every backward operator (boxed, for any signature): the fused backward
// has no derivative of its own, so with grad mode on its outputs get an Error node, which raises
// if anything backpropagates through them (double backward), instead of a silent zero.
inline void no_double_backward(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t num_arguments = arguments.size();
  std::vector<at::Tensor> inputs;
  bool any_requires_grad = false;
  if (at::GradMode::is_enabled()) {
    for (size_t i = stack->size() - num_arguments; i < stack->size(); ++i) {
      const c10::IValue& value = (*stack)[i];
      if (value.isTensor() && value.toTensor().defined()) {
        inputs.push_back(value.toTensor());
        any_requires_grad |= inputs.back().requires_grad();
      }
    }
  }
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!any_requires_grad) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(
      std::string(op.schema().name()) + " has no derivative: the fused backends do not support double "
      "backward (differentiating a gradient of this loss); use backend='reference' for that",
      torch::autograd::collect_next_edges(inputs));
  const size_t num_returns = op.schema().returns().size();
  for (size_t i = stack->size() - num_returns; i < stack->size(); ++i) {
    const at::Tensor& out = (*stack)[i].toTensor();
    if (out.defined() && out.is_floating_point()) torch::autograd::set_history(out, node);
  }
}

}  // namespace fusedloss
