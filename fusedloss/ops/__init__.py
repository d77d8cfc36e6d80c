"""Operator glue per loss family: configuration, validation, fake implementations, autograd."""

from . import blendshape, pva


def register_cpp_ops() -> None:
    """Called once the C++ library is loaded: the Python-side pieces of its operators."""
    pva.register_cpp()
    blendshape.register_cpp()
