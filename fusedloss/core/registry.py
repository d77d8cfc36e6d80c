"""The one list of loss families, and what registers their operators before anything calls them.

A family ``f`` is the package ``fusedloss/f/`` and the folder ``csrc/f/``:
  csrc/f/         the C++ and CUDA operators ``fusedloss::f_forward`` / ``f_backward`` (schemas,
                  kernels, autograd), compiled and registered by the extension build
  f/fake.py       their fake implementations ``forward_fake`` / ``backward_fake``, which
                  ``register_cpp_ops`` registers once the C++ library is loaded
  f/triton.py     the Triton operators ``fusedloss_triton::f_forward`` / ``f_backward`` and their
                  autograd, defined when the module is imported (``import_triton_ops``)
  f/functional.py the route of a call, which picks the family's own operators (``operators``)
Adding a family means adding those two folders and its name to ``FAMILIES``. The families are
imported here by name, when a backend first needs them, so that this shared module depends on
no family.
"""

import importlib

import torch

FAMILIES = ("pva", "blendshape", "score")


def register_cpp_ops() -> None:
    """Called once the C++ library is loaded: the fake (meta) implementations of its operators
    (their autograd is registered in C++: csrc/common/autograd.h)."""
    for family in FAMILIES:
        fake = importlib.import_module(f"fusedloss.{family}.fake")
        torch.library.register_fake(f"fusedloss::{family}_forward")(fake.forward_fake)
        torch.library.register_fake(f"fusedloss::{family}_backward")(fake.backward_fake)


def import_triton_ops() -> None:
    """Defines the Triton operators of every family (imports Triton), before a call is traced."""
    for family in FAMILIES:
        importlib.import_module(f"fusedloss.{family}.triton")
