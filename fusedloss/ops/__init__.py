"""Operator glue per loss family: configuration, validation, fake implementations, autograd.

Each family ``f`` has ``ops/f.py`` (with ``register_cpp()``), ``triton/f.py``, ``csrc/f.cpp`` and
``csrc/cuda/f.cu``; listing it in ``FAMILIES`` registers all of them.
"""

import importlib

FAMILIES = ("pva", "blendshape", "score")


def register_cpp_ops() -> None:
    """Called once the C++ library is loaded: the Python-side pieces of its operators."""
    for family in FAMILIES:
        importlib.import_module(f"{__name__}.{family}").register_cpp()


def import_triton_ops() -> None:
    """Defines the Triton operators (imports Triton)."""
    for family in FAMILIES:
        importlib.import_module(f"fusedloss.triton.{family}")
