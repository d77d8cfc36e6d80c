"""How the C++ extension is built: its sources and compiler flags, in one place for ``setup.py``
(ahead of time) and ``core/extension.py`` (on first use). No imports beyond the standard
library, so that ``setup.py`` can load this file before the package is installed.

``csrc/`` holds one folder per family (``<family>.cpp``: schemas, CPU kernels, CUDA dispatch,
autograd; ``<family>_cuda.cu``: CUDA kernels) and ``common/`` (headers only), plus ``module.cpp``,
the stub of the Python module ``fusedloss._C``.
"""

from __future__ import annotations

from pathlib import Path

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp-simd"]
NVCC_FLAGS = ["-O3", "-std=c++17"]
CUDA_DEFINE = "-DWITH_CUDA"  # compiles the CUDA dispatch of each family's .cpp


def op_sources(csrc: Path, with_cuda: bool) -> list[Path]:
    """The operator library's sources (without the Python module stub ``module.cpp``). No two share
    a path without its suffix: setuptools names an object file after it (``pva/pva.cpp`` and
    ``pva/pva.cu`` would both be ``pva/pva.o``), hence ``<family>_cuda.cu``."""
    sources = sorted(csrc.glob("*/*.cpp"))
    if with_cuda:
        sources += sorted(csrc.glob("*/*.cu"))
    return sources


def cxx_flags(with_cuda: bool) -> list[str]:
    return CXX_FLAGS + ([CUDA_DEFINE] if with_cuda else [])


def nvcc_flags() -> list[str]:
    return NVCC_FLAGS + [CUDA_DEFINE]
