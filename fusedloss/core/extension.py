"""Loading the C++ extension (the "cpu" and "cuda" backends).

``setup.py`` builds it ahead of time as ``fusedloss._C`` (with the CUDA kernels when torch has
CUDA). A package without that module, e.g. a source checkout used through ``PYTHONPATH``,
compiles the same sources on first use with ninja (``torch.utils.cpp_extension.load``), saying so
once: the CPU and CUDA kernels when torch has CUDA and a CUDA toolkit is found (for the
architectures ``build.cuda_arch_list`` chooses), else, or when the CUDA part does not compile, the
CPU kernels alone, saying why the CUDA ones are missing (``no_cuda_reason()``).
``FUSEDLOSS_NO_CUDA=1`` builds the CPU kernels alone. ``FUSEDLOSS_OPS_LIBRARY=/path/to/
libfusedloss_ops.so`` loads a library built with ``CMakeLists.txt`` instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

from . import build

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "no_cuda": None}


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


def cpp_extension():
    """``torch.utils.cpp_extension``, its ``CUDA_HOME`` the toolkit ``build.find_cuda_home`` finds.
    torch fixes that module global at import from the folder above the ``nvcc`` on PATH, which is
    not the toolkit when that ``nvcc`` is a wrapper script; every build function reads the global."""
    import torch.utils.cpp_extension as cpp

    home = build.find_cuda_home(os.environ)
    if home is not None:
        cpp.CUDA_HOME = home
    return cpp


def cuda_build_plan() -> tuple[str | None, str | None]:
    """(the TORCH_CUDA_ARCH_LIST the build on first use compiles the CUDA kernels for, None), or
    (None, why it compiles no CUDA kernels)."""
    import torch

    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a build without CUDA"
    if os.environ.get("FUSEDLOSS_NO_CUDA") == "1":
        return None, "FUSEDLOSS_NO_CUDA=1 is set"
    if build.find_cuda_home(os.environ) is None:
        return None, "no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda)"
    try:
        return build.cuda_arch_list(os.environ, build.torch_cuda_arches(torch)), None
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)


def _compile(cpp, with_cuda: bool, nvcc_flags: list[str] | None) -> None:
    cpp.load(
        name="fusedloss_ops" + ("_cuda" if with_cuda else ""),
        sources=op_sources(with_cuda),
        extra_cflags=build.cxx_flags(with_cuda),
        extra_cuda_cflags=nvcc_flags,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def _last_lines(text: str, count: int = 12) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def _jit_build() -> None:
    """Compile the extension with ninja into torch's extension cache: with the CUDA kernels when
    ``cuda_build_plan`` allows it and they compile, else the CPU kernels alone."""
    cpp = cpp_extension()
    arch_list, no_cuda = cuda_build_plan()
    print(
        "fusedloss: the C++ extension is not built; compiling it now with ninja, once "
        + (f"(CPU kernels, and CUDA kernels for {build.ARCH_VARIABLE}={arch_list}: minutes per "
           f"architecture; set {build.ARCH_VARIABLE} to build for fewer)..." if arch_list
           else "(CPU kernels, about a minute)..."),
        file=sys.stderr,
        flush=True,
    )
    if arch_list is not None:
        try:
            _compile(cpp, True, build.nvcc_flags(os.environ, arch_list))
            return
        except Exception as exc:  # keep the CPU backend: build the CPU kernels alone
            no_cuda = f"its CUDA part did not compile ({type(exc).__name__}):\n{_last_lines(str(exc))}"
    import torch

    if torch.version.cuda is not None:  # (a CPU build of torch expects no CUDA kernels)
        print(f"fusedloss: building the CPU kernels alone: {no_cuda}", file=sys.stderr, flush=True)
    _state["no_cuda"] = no_cuda
    _compile(cpp, False, None)


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


def no_cuda_reason() -> str | None:
    """Why the extension built on first use has no CUDA kernels (None: it has them, or it was
    built ahead of time)."""
    return _state["no_cuda"]


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the loaded library registered a kernel of ``fusedloss::<op>`` for the key."""
    import torch

    return load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op}", dispatch_key)
