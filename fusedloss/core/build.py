"""How the C++ extension is built: its sources, compiler flags, CUDA architectures and CUDA
toolkit, in one place for ``setup.py`` (ahead of time), ``core/extension.py`` (on first use) and
``CMakeLists.txt`` (which runs this file: ``python fusedloss/core/build.py cuda-arch-list`` and
``cuda-home``). No imports beyond the standard library, so that ``setup.py`` can load this file
before the package is installed (torch is passed in where it is needed).

``csrc/`` holds one folder per family (``<family>.cpp``: schemas, CPU kernels, CUDA dispatch,
autograd; ``<family>_cuda.cu``: CUDA kernels) and ``common/`` (headers only), plus ``module.cpp``,
the stub of the Python module ``fusedloss._C``.

The CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set (e.g. ``9.0`` to build for Hopper
alone, a fraction of the build time); otherwise every architecture the installed torch was built
for. Never torch's own default, the architectures of the visible GPUs: a build machine often has
none (``docker build``, a login node), and torch 2.13 then fails with ``IndexError``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp-simd"]
NVCC_FLAGS = ["-O3", "-std=c++17"]
CUDA_DEFINE = "-DWITH_CUDA"  # compiles the CUDA dispatch of each family's .cpp
ARCH_VARIABLE = "TORCH_CUDA_ARCH_LIST"


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


# ---------------------------------------------------------------------------------------------
# CUDA architectures
# ---------------------------------------------------------------------------------------------

_TORCH_ARCH = re.compile(r"(sm|compute)_(\d+)(\d)([a-z]?)")


def torch_cuda_arches(torch) -> list[str]:
    """The architectures the installed ``torch`` was compiled for, as torch names them
    (``['sm_75', ..., 'sm_120']``, ``compute_XY`` for PTX), whether or not a GPU is visible;
    ``[]`` for a CPU build of torch."""
    if torch.version.cuda is None:
        return []
    arches = torch.cuda.get_arch_list()
    if not arches and hasattr(torch._C, "_cuda_getArchFlags"):  # releases that answer [] without a GPU
        arches = torch._C._cuda_getArchFlags().split()
    return list(arches)


def arch_list_of(torch_arches: list[str]) -> str:
    """torch's architecture names as a TORCH_CUDA_ARCH_LIST: ``['sm_80', 'sm_90', 'compute_90']``
    -> ``'8.0;9.0+PTX'`` (``sm_XY``: machine code for X.Y; ``compute_XY``: PTX for it)."""
    arches: dict[str, bool] = {}  # X.Y -> with PTX, in torch's order
    for name in torch_arches:
        match = _TORCH_ARCH.fullmatch(name)
        if match is None:
            raise ValueError(f"unexpected CUDA architecture name {name!r} in torch.cuda.get_arch_list()")
        kind, major, minor, suffix = match.groups()
        arch = f"{major}.{minor}{suffix}"
        arches[arch] = arches.get(arch, False) or kind == "compute"
    return ";".join(arch + ("+PTX" if ptx else "") for arch, ptx in arches.items())


def cuda_arch_list(environ, torch_arches: list[str]) -> str:
    """The architectures to build for, as a TORCH_CUDA_ARCH_LIST: the variable when set, else every
    architecture of ``torch_arches`` (``torch_cuda_arches(torch)``)."""
    chosen = environ.get(ARCH_VARIABLE, "").strip()
    if chosen:
        return chosen
    chosen = arch_list_of(torch_arches)
    if not chosen:
        raise RuntimeError(f"torch names no CUDA architecture it was built for; set {ARCH_VARIABLE} "
                           "(e.g. 9.0 for Hopper) to choose the ones to build for")
    return chosen


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc's ``-gencode`` flags for a TORCH_CUDA_ARCH_LIST of numbered architectures (``'8.0;9.0a;
    12.0+PTX'``), as ``torch.utils.cpp_extension`` makes them: machine code for each, and PTX for
    those marked ``+PTX``."""
    flags = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        arch = entry.removesuffix("+PTX")
        if not re.fullmatch(r"\d+\.\d[a-z]?", arch):
            raise ValueError(f"{ARCH_VARIABLE} entry {entry!r} is not a numbered architecture such as 9.0 or 9.0+PTX")
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if entry.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def nvcc_flags(environ, arch_list: str) -> list[str]:
    """nvcc's flags for the CUDA kernels, built for ``arch_list`` (``cuda_arch_list``). With
    TORCH_CUDA_ARCH_LIST set they name no architecture: ``torch.utils.cpp_extension`` turns the
    variable into flags itself (named architectures included). Without it they carry ``-gencode``
    flags, which also keep torch from adding its default, the visible GPUs' architectures (it adds
    none once a flag names one)."""
    flags = NVCC_FLAGS + [CUDA_DEFINE]
    if not environ.get(ARCH_VARIABLE, "").strip():
        flags += gencode_flags(arch_list)
    return flags


# ---------------------------------------------------------------------------------------------
# CUDA toolkit
# ---------------------------------------------------------------------------------------------


def is_cuda_toolkit(folder) -> bool:
    return folder is not None and (Path(folder) / "include" / "cuda_runtime_api.h").is_file()


def toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit an ``nvcc`` command runs from: the folder above its real file, or, for a wrapper
    script outside the toolkit (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), the ``TOP`` that nvcc
    reports in a dry run (``#$ TOP=/usr/local/cuda-13.0/bin/..``)."""
    beside = Path(os.path.realpath(nvcc)).parent.parent
    if is_cuda_toolkit(beside):
        return str(beside)
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if top is None:
        return None
    folder = Path(os.path.realpath(top.group(1).strip().strip('"')))
    if is_cuda_toolkit(folder):
        return str(folder)
    return None


def find_cuda_home(environ) -> str | None:
    """The CUDA toolkit to build with: ``CUDA_HOME`` or ``CUDA_PATH`` when set; else the toolkit of
    the ``nvcc`` on PATH (``toolkit_of_nvcc``: torch guesses the folder above the one holding it,
    wrong for a wrapper script); else ``/usr/local/cuda``; None if there is none."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return environ[name]
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is not None:
        home = toolkit_of_nvcc(nvcc)
        if home is not None:
            return home
    return "/usr/local/cuda" if is_cuda_toolkit("/usr/local/cuda") else None


def nvrtc_library(cuda_home: str | None, torch_dir: str) -> str | None:
    """The NVRTC library that Torch's CMake package links: the toolkit's, else the copy that torch's
    CUDA wheels install beside it (``site-packages/nvidia/*/lib``), for a toolkit installed
    without NVRTC (only nvcc and the runtime, as on the project's machines)."""
    folders = [Path(cuda_home) / sub for sub in ("lib64", "lib")] if cuda_home else []
    folders += sorted(Path(cuda_home).glob("targets/*/lib")) if cuda_home else []
    for folder in folders:
        if (folder / "libnvrtc.so").exists():
            return str(folder / "libnvrtc.so")
    wheels = sorted(Path(torch_dir).parent.glob("nvidia/*/lib/libnvrtc.so*"))
    wheels = [p for p in wheels if re.fullmatch(r"libnvrtc\.so(\.\d+)*", p.name)]
    return str(wheels[0]) if wheels else None


def main(argv: list[str]) -> int:
    """``cuda-arch-list``: the TORCH_CUDA_ARCH_LIST to build for (nothing for a CPU build of torch);
    ``cuda-home``: the CUDA toolkit; ``cuda-nvrtc``: its NVRTC library (``nvrtc_library``);
    (nothing when none is found). For CMakeLists.txt."""
    if argv == ["cuda-arch-list"]:
        import torch

        if torch.version.cuda is not None:
            print(cuda_arch_list(os.environ, torch_cuda_arches(torch)))
        return 0
    if argv == ["cuda-home"]:
        print(find_cuda_home(os.environ) or "")
        return 0
    if argv == ["cuda-nvrtc"]:
        import torch

        print(nvrtc_library(find_cuda_home(os.environ), os.path.dirname(torch.__file__)) or "")
        return 0
    print("usage: python fusedloss/core/build.py cuda-arch-list | cuda-home | cuda-nvrtc", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
