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
    if isinstance(backward_op, str):
        namespace, name = backward_op.split("::")
        backward_op = getattr(getattr(torch.ops, namespace), name).default
    op_name = str(forward_op)

    def setup_context(ctx, inputs, output):
        for i, value in enumerate(inputs):
            if isinstance(value, torch.Tensor) and value.requires_grad and i not in grad_inputs:
                raise RuntimeError(
                    f"{op_name}: input {i} requires grad, but this fused backend has no gradient "
                    f"for it; detach it or use backend='reference'"
                )
        ctx.set_materialize_grads(False)
        aux = tuple(output[2:2 + num_aux])
        ctx.mark_non_differentiable(*aux)
        tensor_positions = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) or v is None]
        ctx.save_for_backward(*aux, *(inputs[i] for i in tensor_positions))
        ctx.tensor_positions = tensor_positions
        ctx.other_inputs = {i: v for i, v in enumerate(inputs) if i not in tensor_positions}
        ctx.num_inputs = len(inputs)
        terms = output[0]
        ctx.terms_meta = (terms.shape[0], terms.dtype, terms.device)

    def backward(ctx, grad_terms, grad_total, *aux_grads):
        no_grads = (None,) * ctx.num_inputs
        if grad_terms is None and grad_total is None:
            return no_grads
        mask = [bool(ctx.needs_input_grad[i]) for i in grad_inputs]
        if not any(mask):
            return no_grads
        saved = ctx.saved_tensors
        aux, saved_inputs = saved[:num_aux], saved[num_aux:]
        inputs = dict(ctx.other_inputs)
        inputs.update(zip(ctx.tensor_positions, saved_inputs))
        num_terms, dtype, device = ctx.terms_meta
        if grad_terms is None:
            grad_terms = _zero(dtype, device).expand(num_terms)
        if grad_total is None:
            grad_total = _zero(dtype, device)
        grads = backward_op(grad_terms, grad_total, *aux, *(inputs[i] for i in range(ctx.num_inputs)), mask)
        result = list(no_grads)
        for position, wanted, grad in zip(grad_inputs, mask, grads):
            if wanted:
                result[position] = grad
        return tuple(result)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
