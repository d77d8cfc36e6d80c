"""The one list of loss families, and the one place their operators are registered.

A family ``f`` is the package ``fusedloss/f/`` (``ops.py`` with ``register_cpp()``, ``triton.py``
defining its Triton operators) and the folder ``csrc/f/`` (its C++ and CUDA operators, compiled
and registered by the extension build). Adding a family means adding those two folders and its
name to ``FAMILIES``. The families are imported here by name, when a backend first needs them,
so that this shared module depends on no family.
"""

import importlib

FAMILIES = ("pva", "blendshape", "score")


def register_cpp_ops() -> None:
    """Called once the C++ library is loaded: the fake (meta) implementations of its operators."""
    for family in FAMILIES:
        importlib.import_module(f"fusedloss.{family}.ops").register_cpp()


def import_triton_ops() -> None:
    """Defines the Triton operators of every family (imports Triton)."""
    for family in FAMILIES:
        importlib.import_module(f"fusedloss.{family}.triton")
