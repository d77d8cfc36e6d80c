"""Builds the C++ extension fusedloss._C: CPU kernels, plus the CUDA kernels when torch has CUDA.

Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
The CUDA kernels are built for TORCH_CUDA_ARCH_LIST when set (e.g. "9.0": Hopper alone, a
fraction of the build time), else for every architecture the installed torch was built for, with
or without a GPU here (fusedloss/core/build.py). The CUDA toolkit: CUDA_HOME, else the one behind
the nvcc on PATH. FUSEDLOSS_NO_CUDA=1 builds CPU kernels only; FUSEDLOSS_NO_EXTENSION=1 builds
nothing (the package then compiles the extension with ninja on first use).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def load_build_module():
    """fusedloss/core/build.py (sources and flags), without importing the package."""
    spec = importlib.util.spec_from_file_location("fusedloss_build", ROOT / "fusedloss" / "core" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"fusedloss: {message}", file=sys.stderr, flush=True)


def extension_modules():
    if os.environ.get("FUSEDLOSS_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        say("torch is not importable at build time; the C++ extension will be compiled on first use "
            "instead (install with --no-build-isolation to build it now)")
        return [], {}
    build = load_build_module()
    with_cuda = torch.version.cuda is not None and os.environ.get("FUSEDLOSS_NO_CUDA") != "1"
    if with_cuda:
        cuda_home = build.find_cuda_home(os.environ)
        if cuda_home is None:
            say(f"torch {torch.__version__} has CUDA but no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME "
                "unset): building the CPU kernels alone")
            with_cuda = False
        else:  # (torch.utils.cpp_extension reads it once, when imported)
            os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp

    sources = [str(p.relative_to(ROOT)) for p in [ROOT / "csrc" / "module.cpp", *build.op_sources(ROOT / "csrc", with_cuda)]]
    if with_cuda:
        cpp.CUDA_HOME = os.environ["CUDA_HOME"]  # in case torch.utils.cpp_extension was imported already
        arch_list = build.cuda_arch_list(os.environ, build.torch_cuda_arches(torch))
        say(f"building the CUDA kernels for {build.ARCH_VARIABLE}={arch_list} with the toolkit in {cpp.CUDA_HOME} "
            f"(set {build.ARCH_VARIABLE} to build for fewer architectures)")
        ext = cpp.CUDAExtension("fusedloss._C", sources, extra_compile_args={
            "cxx": build.cxx_flags(True), "nvcc": build.nvcc_flags(os.environ, arch_list)})
    else:
        ext = cpp.CppExtension("fusedloss._C", sources, extra_compile_args={"cxx": build.cxx_flags(False)})
    return [ext], {"build_ext": cpp.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # (pip and setuptools run this file as __main__; tests/test_build.py imports it)
    ext_modules, cmdclass = extension_modules()
    setup(
        packages=find_packages(include=["fusedloss", "fusedloss.*"]) + ["fusedloss.csrc"],
        # The C++/CUDA sources travel with the package for the build-on-first-use fallback
        # (tests/test_packaging.py builds a wheel and compiles them from it).
        package_dir={"fusedloss.csrc": "csrc"},
        package_data={"fusedloss.csrc": ["*.cpp", "*/*.cpp", "*/*.h", "*/*.cu", "*/*.cuh"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
