"""The autograd glue of the Triton operators: the Python twin of ``csrc/common/autograd.h``.

The C++ operators (backends "cpu" and "cuda") register their autograd in C++ (``csrc/common/autograd.h``),
so an eager step runs no Python between the forward call and the backward kernel. The Triton
operators are defined in Python (``torch.library.triton_op``), so their autograd is registered
here, with the same convention:
  forward(*inputs) -> (terms [T], total [], *aux)
  backward(grad_terms [T], grad_total [], *aux, *inputs, mask) -> one gradient per grad_inputs entry
``total`` is a fixed linear combination of the terms computed by the forward kernel, so
d(loss)/d(term i) = grad_terms[i] + weight_i * grad_total, which the backward kernel forms itself.
``aux`` are non-differentiable per-problem statistics the forward already computed and the backward
reuses (e.g. column sums). ``mask[i]`` says whether the gradient of ``inputs[grad_inputs[i]]`` is
wanted (an empty tensor is returned otherwise). Inputs outside ``grad_inputs`` get no gradient:
``constants`` (targets, labels) by the losses' contract, and the tables, which must not require
one.

This one Python statement of the convention (``_formula``) backs three routes:
  the Triton operators       ``torch.library.register_autograd`` (under torch.compile, fake tensors)
  eager Triton calls         ``terms_function`` over the launchers (no dispatcher on the way)
  a family over a group      ``terms_function`` over a forward that reduces across ranks and a
                             backward that scales the gradients (blendshape/distributed.py)

Every tensor is saved with ``save_for_backward`` (so saved-tensor hooks see all of them); the
other arguments are kept on the context. A gradient that does not reach an output is never
materialised: a missing grad_terms is a cached zero scalar expanded to [T] (stride 0) and a
missing grad_total that zero scalar, so backpropagating only ``total`` (the common case) launches
nothing but the backward kernel.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake  # (loaded by torch itself)

_ZEROS: dict = {}


def _zero(dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero on ``like``'s device, cached per (dtype, device) for eager use on real tensors
    (never written to); a fresh one while tracing or on fake tensors."""
    if torch.compiler.is_compiling() or is_fake(like):
        return torch.zeros((), dtype=dtype, device=like.device)
    key = (dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=dtype, device=like.device)
    return zero


def register_terms_autograd(forward_op, backward_op, grad_inputs: tuple[int, ...], num_aux: int = 0,
                            constants: tuple[int, ...] = ()):
    """Register the autograd formula of the Triton operator ``forward_op`` in terms of ``backward_op``.

    Returns the same formula as an ``autograd.Function`` that calls the two launchers directly
    (``op._init_fn``), for eager calls on real tensors: it skips the dispatcher and the custom-op
    autograd machinery, which cost more than the launches at small shapes. Under torch.compile
    and on fake tensors the operator itself is called (the family's ``functional.py`` picks which).
    """
    schema = _overload(forward_op)._schema
    name, arguments = schema.name, tuple(a.name for a in schema.arguments)
    setup_context, backward = _formula(backward_op, grad_inputs, num_aux, constants, name, arguments)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
    return terms_function(forward_op._init_fn, backward_op._init_fn, grad_inputs, num_aux, constants,
                          name=f"{name.split('::')[-1]}_eager", arguments=arguments)


def terms_function(forward_call, backward_call, grad_inputs: tuple[int, ...], num_aux: int = 0,
                   constants: tuple[int, ...] = (), name: str = "terms_function", arguments: tuple[str, ...] = ()):
    """The formula above as an ``autograd.Function`` (its ``apply``): ``forward_call(*inputs) ->
    (terms, total, *aux)`` and ``backward_call(grad_terms, grad_total, *aux, *inputs, mask)`` are
    plain calls that build no autograd graph (launchers, or operators called inside a Function).
    ``arguments`` names the inputs in error messages. Used for the eager Triton route, and by a
    wrapper that runs a family's operators over a process group (blendshape/distributed.py)."""
    setup_context, backward = _formula(backward_call, grad_inputs, num_aux, constants, name, arguments, eager=True)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return forward_call(*inputs)

    Function.setup_context = staticmethod(setup_context)
    Function.backward = staticmethod(backward)
    Function.__name__ = Function.__qualname__ = name
    return Function.apply


class _NoDerivative(torch.autograd.Function):
    """A gradient of a ``terms_function`` with create_graph=True: differentiating it raises (its
    backward call builds no graph, so it would otherwise count as 0)."""

    @staticmethod
    def forward(grad, *inputs):
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("the fused backends do not support double backward (differentiating a gradient of "
                           "this loss); use backend='reference' for that")


def _formula(backward_call, grad_inputs: tuple[int, ...], num_aux: int, constants: tuple[int, ...], name: str,
             arguments: tuple[str, ...] = (), eager: bool = False):
    """(setup_context, backward) of the convention above, the backward calling ``backward_call``
    (``eager``: a plain call building no graph, whose gradients get _NoDerivative under
    create_graph=True). The tensor inputs are saved; the tables among them (neither in
    ``grad_inputs`` nor ``constants``) must not require grad."""
    differentiable_or_constant = set(grad_inputs) | set(constants)

    def setup_context(ctx, inputs, output):
        tensors = tuple(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor))
        if torch.is_grad_enabled():
            for i in tensors:  # as csrc/common/autograd.h's refuse_grad: raising beats dropping a gradient
                if inputs[i].requires_grad and i not in differentiable_or_constant:
                    argument = arguments[i] if i < len(arguments) else f"argument {i}"
                    raise RuntimeError(f"{name}: {argument} requires grad, but the fused backends have no gradient "
                                       "for it; detach it or use backend='reference'")
        ctx.set_materialize_grads(False)
        aux = output[2:2 + num_aux]
        ctx.mark_non_differentiable(*aux)
        ctx.save_for_backward(*aux, *(inputs[i] for i in tensors))
        args = list(inputs)
        for i in tensors:
            args[i] = None  # restored from the saved tensors in backward
        ctx.args, ctx.tensors = args, tensors
        terms = output[0]
        ctx.terms_meta = (terms.shape[0], terms.dtype)

    def backward(ctx, grad_terms, grad_total, *aux_grads):
        num_inputs = len(ctx.args)
        if grad_terms is None and grad_total is None:
            return (None,) * num_inputs
        needs = ctx.needs_input_grad
        mask = [bool(needs[i]) for i in grad_inputs]
        if not any(mask):
            return (None,) * num_inputs
        saved = ctx.saved_tensors
        args = list(ctx.args)
        for i, tensor in zip(ctx.tensors, saved[num_aux:]):
            args[i] = tensor
        num_terms, dtype = ctx.terms_meta
        like = saved[num_aux]
        if grad_terms is None:
            grad_terms = _zero(dtype, like).expand(num_terms)
        if grad_total is None:
            grad_total = _zero(dtype, like)
        grads = backward_call(grad_terms, grad_total, *saved[:num_aux], *args, mask)
        result = [None] * num_inputs
        inputs = [args[i] for i in grad_inputs if args[i] is not None]
        for position, wanted, grad in zip(grad_inputs, mask, grads):
            if wanted:
                result[position] = _NoDerivative.apply(grad, *inputs) if eager and torch.is_grad_enabled() else grad
        return tuple(result)

    return setup_context, backward


def _overload(op):
    """The OpOverload of a custom op object, or op itself."""
    return getattr(op, "_opoverload", op)


# ---------------------------------------------------------------------------------------------
# Helpers of a call plan (each family's ``*_plan``)
# ---------------------------------------------------------------------------------------------


def constant(x: torch.Tensor) -> torch.Tensor:
    """A constant of the loss (a previous prediction, labels) with no autograd history."""
    return x.detach() if x.requires_grad else x


def is_eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs eagerly on real tensors (not traced, not fake)."""
    return not torch.compiler.is_compiling() and not is_fake(x)
