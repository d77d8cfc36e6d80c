"""Builds the C++ extension fusedloss._C: CPU kernels, plus the CUDA kernels when torch has CUDA.

Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
FUSEDLOSS_NO_CUDA=1 builds CPU kernels only; FUSEDLOSS_NO_EXTENSION=1 builds nothing (the
package then compiles the extension with ninja on first use).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def load_build_module():
    """fusedloss/core/build.py (sources and flags), without importing the package."""
    spec = importlib.util.spec_from_file_location("fusedloss_build", ROOT / "fusedloss" / "core" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_modules():
    if os.environ.get("FUSEDLOSS_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError:
        print("fusedloss: torch is not importable at build time; the C++ extension will be "
              "compiled on first use instead (install with --no-build-isolation to build it now)",
              file=sys.stderr)
        return [], {}
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("FUSEDLOSS_NO_CUDA") != "1")
    build = load_build_module()
    sources = [str(p.relative_to(ROOT)) for p in [ROOT / "csrc" / "module.cpp", *build.op_sources(ROOT / "csrc", with_cuda)]]
    if with_cuda:
        ext = CUDAExtension("fusedloss._C", sources, extra_compile_args={
            "cxx": build.cxx_flags(True), "nvcc": build.nvcc_flags()})
    else:
        ext = CppExtension("fusedloss._C", sources, extra_compile_args={"cxx": build.cxx_flags(False)})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["fusedloss", "fusedloss.core", "fusedloss.pva", "fusedloss.blendshape", "fusedloss.score",
              "fusedloss.benchmark", "fusedloss.trainers",
              "fusedloss.csrc"],
    # The C++/CUDA sources travel with the package for the build-on-first-use fallback
    # (tests/test_packaging.py builds a wheel and compiles them from it).
    package_dir={"fusedloss.csrc": "csrc"},
    package_data={"fusedloss.csrc": ["*.cpp", "*/*.cpp", "*/*.h", "*/*.cu", "*/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
