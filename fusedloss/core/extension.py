"""Loading the C++ extension (the "cpu" and "cuda" backends).

``setup.py`` builds it ahead of time as ``fusedloss._C`` (with the CUDA kernels when torch has
CUDA). A package without that module, e.g. a source checkout used through ``PYTHONPATH``,
compiles the same sources on first use with ninja (``torch.utils.cpp_extension.load``), saying so
once. ``FUSEDLOSS_OPS_LIBRARY=/path/to/libfusedloss_ops.so`` loads a library built with
``CMakeLists.txt`` instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

from . import build

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``csrc/`` of a source checkout, or ``fusedloss/csrc`` when installed."""
    package = Path(__file__).resolve().parent.parent  # fusedloss/
    for candidate in (package.parent / "csrc", package / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise FileNotFoundError("fusedloss: the C++ sources (csrc/) are not next to the package")


def op_sources(with_cuda: bool) -> list[str]:
    """Sources of the operator library (the Python module stub ``module.cpp`` excluded)."""
    return [str(p) for p in build.op_sources(csrc_dir(), with_cuda)]


def _cuda_toolchain() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _jit_build() -> None:
    """Compile the extension with ninja into torch's extension cache."""
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_toolchain()
    print(
        f"fusedloss: the C++ extension is not built; compiling it now with ninja "
        f"({'CPU and CUDA' if with_cuda else 'CPU'} kernels, about a minute, once)...",
        file=sys.stderr,
        flush=True,
    )
    load(
        name="fusedloss_ops" + ("_cuda" if with_cuda else ""),
        sources=op_sources(with_cuda),
        extra_cflags=build.cxx_flags(with_cuda),
        extra_cuda_cflags=build.nvcc_flags() if with_cuda else None,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def load() -> bool:
    """Make the ``torch.ops.fusedloss`` C++ operators available; False (and ``error()``) if not."""
    if _state["loaded"]:
        return True
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        try:
            import torch

            library = os.environ.get("FUSEDLOSS_OPS_LIBRARY")
            if library:
                torch.ops.load_library(library)
            else:
                try:
                    importlib.import_module("fusedloss._C")
                except ImportError:
                    _jit_build()
            from .registry import register_cpp_ops

            register_cpp_ops()
            _state["loaded"] = True
        except Exception as exc:  # keep the reason for the "backend unavailable" message
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def error() -> str | None:
    return _state["error"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded library registered a kernel of ``fusedloss::<op>`` for the key."""
    import torch

    return load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op}", dispatch_key)
