"""The one autograd formula of every fused loss operator.

Convention of each family's operators (whatever the backend):
  forward(*inputs)                        -> (terms [T], total [])
  backward(grad_terms [T], *inputs, mask) -> one gradient per position in ``grad_inputs``
with ``total = sum(terms)`` computed by the forward kernel, and ``mask[i]`` saying whether the
gradient of ``inputs[grad_inputs[i]]`` is wanted (an empty tensor is returned otherwise).

Backpropagating only ``total`` (the common case) hands the backward kernel ``grad_total``
expanded to ``[T]`` with stride 0: no extra kernel. Gradients that do not reach an output are
not materialised as zeros.
"""

from __future__ import annotations

import torch


def _grad_terms(grad_terms, grad_total, num_terms: int):
    if grad_terms is None:
        return grad_total.expand(num_terms)
    if grad_total is None:
        return grad_terms
    return grad_terms + grad_total


def register_terms_autograd(forward_op, backward_op, grad_inputs: tuple[int, ...]) -> None:
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
        tensor_positions = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) or v is None]
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
        ctx.tensor_positions = tensor_positions
        ctx.other_inputs = {i: v for i, v in enumerate(inputs) if i not in tensor_positions}
        ctx.num_inputs = len(inputs)
        ctx.num_terms = output[0].shape[0]

    def backward(ctx, grad_terms, grad_total):
        no_grads = (None,) * ctx.num_inputs
        if grad_terms is None and grad_total is None:
            return no_grads
        mask = [bool(ctx.needs_input_grad[i]) for i in grad_inputs]
        if not any(mask):
            return no_grads
        inputs = dict(ctx.other_inputs)
        inputs.update(zip(ctx.tensor_positions, ctx.saved_tensors))
        args = [inputs[i] for i in range(ctx.num_inputs)]
        grads = backward_op(_grad_terms(grad_terms, grad_total, ctx.num_terms), *args, mask)
        result = list(no_grads)
        for position, wanted, grad in zip(grad_inputs, mask, grads):
            if wanted:
                result[position] = grad
        return tuple(result)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
