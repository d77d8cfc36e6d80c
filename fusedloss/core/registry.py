"""The one list of loss families, and the one place their operators are registered.

A family ``f`` is the package ``fusedloss/f/`` (``ops.py`` with the fake implementations
``forward_fake`` / ``backward_fake`` of its operators, ``triton.py`` defining its Triton operators
``f_forward`` / ``f_backward`` and the eager form ``f_forward_eager``) and the folder ``csrc/f/``
(its C++ and CUDA operators ``fusedloss::f_forward`` / ``f_backward``, compiled and registered by
the extension build). Adding a family means adding those two folders and its name to
``FAMILIES``. The families are imported here by name, when a backend first needs them, so that
this shared module depends on no family.
"""

import importlib

import torch

FAMILIES = ("pva", "blendshape", "score")


def register_cpp_ops() -> None:
    """Called once the C++ library is loaded: the fake (meta) implementations of its operators
    (their autograd is registered in C++: csrc/common/autograd.h)."""
    for family in FAMILIES:
        ops = importlib.import_module(f"fusedloss.{family}.ops")
        torch.library.register_fake(f"fusedloss::{family}_forward")(ops.forward_fake)
        torch.library.register_fake(f"fusedloss::{family}_backward")(ops.backward_fake)


def import_triton_ops() -> None:
    """Defines the Triton operators of every family (imports Triton)."""
    for family in FAMILIES:
        importlib.import_module(f"fusedloss.{family}.triton")


def forward_op(family: str, backend: str, *, eager: bool = False):
    """The forward operator of ``family`` on a fused backend (autograd, fake tensors and compile
    included). ``eager``: for an eager call on real tensors (Triton: the same formula without the
    dispatcher, core/autograd.py)."""
    if backend == "triton":
        triton = importlib.import_module(f"fusedloss.{family}.triton")
        return getattr(triton, f"{family}_forward_eager" if eager else f"{family}_forward")
    return getattr(torch.ops.fusedloss, f"{family}_forward").default


def backward_op(family: str, backend: str):
    """The backward operator of ``family`` on a fused backend (called by code that forms its own
    autograd, as the losses over a process group do)."""
    if backend == "triton":
        return getattr(importlib.import_module(f"fusedloss.{family}.triton"), f"{family}_backward")
    return getattr(torch.ops.fusedloss, f"{family}_backward").default
