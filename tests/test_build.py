"""The C++/CUDA sources build everywhere they should: nvcc alone, the CUDA dispatch, CMake.

Without a GPU nothing CUDA runs here, but nvcc compiles the kernels (they include no torch
headers) and the CUDA dispatch code is compiled against torch's headers, so a typo cannot wait
for the next GPU machine.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from fusedloss.core import build

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = [p for p in build.op_sources(ROOT / "csrc", with_cuda=True) if p.suffix == ".cu"]
CPP_SOURCES = build.op_sources(ROOT / "csrc", with_cuda=False)


def test_the_builds_see_every_family_source():
    """The source lists the build checks below run over (an empty one would skip them silently), and
    no two sources share an object file name (setuptools names objects after the path without its
    suffix, so pva/pva.cpp and pva/pva.cu would overwrite one another)."""
    families = ("pva", "blendshape", "score")
    assert {p.parent.name for p in CUDA_SOURCES} == set(families)
    assert {p.parent.name for p in CPP_SOURCES} == set(families)
    stems = [p.with_suffix("") for p in build.op_sources(ROOT / "csrc", with_cuda=True)]
    assert len(stems) == len(set(stems)), stems
NVCC = shutil.which("nvcc")
# What torch.utils.cpp_extension passes to nvcc for every extension: the kernels must build with it.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def cuda_home() -> Path | None:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return Path(candidate)
    if NVCC:
        home = Path(NVCC).resolve().parent.parent
        if (home / "include" / "cuda_runtime_api.h").is_file():
            return home
    return None


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile_with_nvcc(tmp_path, source):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-Werror", "all-warnings", *TORCH_NVCC_FLAGS, "-c", str(source),
         "-o", str(tmp_path / "k.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(cuda_home() is None, reason="the CUDA headers are not installed")
@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA: setup.py compiles this for real")
@pytest.mark.parametrize("source", CPP_SOURCES, ids=lambda p: p.name)
def test_cuda_dispatch_code_compiles_against_torch_headers(tmp_path, source):
    """Syntax-check the WITH_CUDA parts of the C++ sources. A CPU build of torch ships the c10/cuda
    headers but not the generated cuda_cmake_macros.h, which a stub replaces here."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    include = Path(torch.utils.cpp_extension.include_paths()[0])
    cmd = [
        os.environ.get("CXX", "g++"), "-std=c++20", "-fsyntax-only", "-DWITH_CUDA",
        f"-I{tmp_path}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{cuda_home() / 'include'}", f"-I{sysconfig.get_paths()['include']}", str(source),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_registers_working_operators(tmp_path):
    """CMakeLists.txt builds libfusedloss_ops.so through Torch's CMake package; loaded with
    FUSEDLOSS_OPS_LIBRARY it serves the 'cpu' backend."""
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DFUSEDLOSS_WITH_CUDA=OFF"],
        capture_output=True, text=True, timeout=600,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    library = build / "libfusedloss_ops.so"
    assert library.is_file()
    code = (
        "import sys, torch; from fusedloss import functional as F\n"
        "x, y = torch.randn(2, 5, 265, dtype=torch.float64), torch.randn(2, 5, 265, dtype=torch.float64)\n"
        "a = F.pva_loss(x, y, backend='cpu')[0]; r = F.pva_loss(x, y, backend='reference')[0]\n"
        "assert 'fusedloss._C' not in sys.modules\n"
        "print(float((a - r).abs()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FUSEDLOSS_OPS_LIBRARY": str(library)}, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) < 1e-12


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles and runs the kernels for real")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The launchers' real arguments, specialised as Triton's JIT does (ints equal to 1 become
    constexprs), compile to sm_90 code: GPU-only compile errors show up here."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90_compile.py")], capture_output=True,
                            text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "OK:" in result.stdout
