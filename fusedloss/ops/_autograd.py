"""The one autograd formula of every fused loss operator.

Convention of each family's operators (whatever the backend):
  forward(*inputs) -> (terms [T], total [], *aux)
  backward(grad_terms [T], grad_total [], *aux, *inputs, mask) -> one gradient per grad_inputs entry
``total`` is a fixed linear combination of the terms computed by the forward kernel, so
d(loss)/d(term i) = grad_terms[i] + weight_i * grad_total, which the backward kernel forms itself.
``aux`` are non-differentiable per-problem statistics the forward already computed and the backward
reuses (e.g. column sums). ``mask[i]`` says whether the gradient of ``inputs[grad_inputs[i]]`` is
wanted (an empty tensor is returned otherwise).

A gradient that does not reach an output is never materialised: a missing grad_terms is a cached
zero scalar expanded to [T] (stride 0) and a missing grad_total that zero scalar, so backpropagating
only ``total`` (the common case) launches nothing but the backward kernel.
"""

from __future__ import annotations

import torch

_ZEROS: dict = {}


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero, cached per (dtype, device) for eager use (never written to)."""
    if torch.compiler.is_compiling():
        return torch.zeros((), dtype=dtype, device=device)
    key = (dtype, device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=dtype, device=device)
    return zero


def register_terms_autograd(forward_op, backward_op, grad_inputs: tuple[int, ...], num_aux: int = 0) -> None:
    """Register the autograd formula of ``forward_op`` in terms of ``backward_op``."""
    backward_op = _overload(backward_op)
    op_name = str(forward_op)
    schema = _overload(forward_op)._schema
    # Positions of the tensor arguments (saved for backward) and of those without a gradient.
    tensor_positions = tuple(i for i, a in enumerate(schema.arguments) if "Tensor" in str(a.type))
    no_grad_positions = tuple(i for i in tensor_positions if i not in grad_inputs)

    def setup_context(ctx, inputs, output):
        for i in no_grad_positions:
            if inputs[i] is not None and inputs[i].requires_grad:
                raise RuntimeError(
                    f"{op_name}: input {i} requires grad, but this fused backend has no gradient "
                    f"for it; detach it or use backend='reference'"
                )
        ctx.set_materialize_grads(False)
        aux = output[2:2 + num_aux]
        ctx.mark_non_differentiable(*aux)
        ctx.save_for_backward(*aux, *(inputs[i] for i in tensor_positions))
        ctx.inputs = inputs  # the non-tensor arguments are read from here
        terms = output[0]
        ctx.terms_meta = (terms.shape[0], terms.dtype, terms.device)

    def backward(ctx, grad_terms, grad_total, *aux_grads):
        num_inputs = len(ctx.inputs)
        if grad_terms is None and grad_total is None:
            return (None,) * num_inputs
        needs = ctx.needs_input_grad
        mask = [bool(needs[i]) for i in grad_inputs]
        if not any(mask):
            return (None,) * num_inputs
        saved = ctx.saved_tensors
        args = list(ctx.inputs)
        for i, tensor in zip(tensor_positions, saved[num_aux:]):
            args[i] = tensor
        num_terms, dtype, device = ctx.terms_meta
        if grad_terms is None:
            grad_terms = _zero(dtype, device).expand(num_terms)
        if grad_total is None:
            grad_total = _zero(dtype, device)
        grads = backward_op(grad_terms, grad_total, *saved[:num_aux], *args, mask)
        result = [None] * num_inputs
        for position, wanted, grad in zip(grad_inputs, mask, grads):
            if wanted:
                result[position] = grad
        return tuple(result)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _overload(op):
    """The OpOverload of "namespace::name", of a custom op object, or op itself."""
    if isinstance(op, str):
        namespace, name = op.split("::")
        return getattr(getattr(torch.ops, namespace), name).default
    return getattr(op, "_opoverload", op)
