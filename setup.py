"""Builds the C++ extension fusedloss._C: CPU kernels, plus the CUDA kernels when torch has CUDA.

Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
FUSEDLOSS_NO_CUDA=1 builds CPU kernels only; FUSEDLOSS_NO_EXTENSION=1 builds nothing (the
package then compiles the extension with ninja on first use).
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def extension_modules():
    if os.environ.get("FUSEDLOSS_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fusedloss: torch is not importable at build time; the C++ extension will be "
              "compiled on first use instead (install with --no-build-isolation to build it now)",
              file=sys.stderr)
        return [], {}
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("FUSEDLOSS_NO_CUDA") != "1")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp-simd"]
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        ext = CUDAExtension("fusedloss._C", sources, extra_compile_args={
            "cxx": cxx + ["-DWITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-DWITH_CUDA"]})
    else:
        ext = CppExtension("fusedloss._C", sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["fusedloss", "fusedloss.ops", "fusedloss.triton", "fusedloss.benchmark", "fusedloss.trainers",
              "fusedloss.csrc", "fusedloss.csrc.cuda"],
    # The C++/CUDA sources travel with the package for the build-on-first-use fallback.
    package_dir={"fusedloss.csrc": "csrc", "fusedloss.csrc.cuda": "csrc/cuda"},
    package_data={"fusedloss.csrc": ["*.cpp", "*.h"], "fusedloss.csrc.cuda": ["*.cu", "*.cuh", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
