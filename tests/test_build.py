"""The C++/CUDA sources build everywhere they should: nvcc alone, the CUDA dispatch, CMake; and
the builds choose the CUDA architectures and toolkit as a machine without a GPU needs.

Without a GPU nothing CUDA runs here, but nvcc compiles the kernels (they include no torch
headers) and the CUDA dispatch code is compiled against torch's headers, so a typo cannot wait
for the next GPU machine. The builds with a CUDA build of torch run in scripts/cuda_build_check.sh
(too heavy for CI); the choices they make are tested here, with torch's answers mocked.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from fusedloss.core import build, extension

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
         f"-DPython3_EXECUTABLE={sys.executable}", "-DFUSEDLOSS_WITH_CUDA=OFF"],
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


# ---------------------------------------------------------------------------------------------
# The CUDA architectures and toolkit the builds choose (fusedloss/core/build.py)
# ---------------------------------------------------------------------------------------------

# torch.cuda.get_arch_list() of the registry's torch 2.13.0+cu130, with or without a GPU.
CU130_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU130_GENCODES = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (75, 80, 86, 90, 100, 120)]


@pytest.fixture
def cuda_torch_without_gpu(monkeypatch):
    """torch answering as the CUDA build 2.13.0+cu130 does on a machine without a GPU, with no
    TORCH_CUDA_ARCH_LIST set."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CU130_ARCHES))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def load_setup_py():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("fusedloss_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_gpu_or_variable_the_builds_take_torchs_architectures(cuda_torch_without_gpu, monkeypatch, tmp_path,
                                                                     capsys):
    """No GPU and no TORCH_CUDA_ARCH_LIST: setup.py, the build on first use and CMake compile for
    every architecture torch was built for. torch's own default, the visible GPUs' architectures,
    raises IndexError when there is none (torch 2.13); the -gencode flags keep torch from using it."""
    assert build.cuda_arch_list(os.environ, build.torch_cuda_arches(torch)) == "7.5;8.0;8.6;9.0;10.0;12.0"
    # What CMakeLists.txt reads (`python fusedloss/core/build.py cuda-arch-list`).
    assert build.main(["cuda-arch-list"]) == 0
    assert capsys.readouterr().out == "7.5;8.0;8.6;9.0;10.0;12.0\n"
    # The build on first use.
    monkeypatch.setattr(build, "find_cuda_home", lambda environ: str(tmp_path))
    arch_list, no_cuda = extension.cuda_build_plan()
    assert (arch_list, no_cuda) == ("7.5;8.0;8.6;9.0;10.0;12.0", None)
    flags = build.nvcc_flags(os.environ, arch_list)
    assert [f for f in flags if f.startswith("-gencode")] == CU130_GENCODES
    assert torch.utils.cpp_extension._get_cuda_arch_flags(flags) == []   # no IndexError, nothing added
    # setup.py, with a toolkit folder of its own.
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("FUSEDLOSS_NO_CUDA", raising=False)
    monkeypatch.delenv("FUSEDLOSS_NO_EXTENSION", raising=False)
    (ext,), _ = load_setup_py().extension_modules()
    assert torch.utils.cpp_extension.CUDA_HOME == str(tmp_path)
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-DWITH_CUDA" in nvcc and [f for f in nvcc if f.startswith("-gencode")] == CU130_GENCODES
    assert torch.utils.cpp_extension._get_cuda_arch_flags(nvcc) == []


def test_torch_cuda_arch_list_when_set_is_left_to_torch(cuda_torch_without_gpu, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.cuda_arch_list(os.environ, build.torch_cuda_arches(torch)) == "9.0"
    flags = build.nvcc_flags(os.environ, "9.0")
    assert not any("arch" in f for f in flags)
    assert torch.utils.cpp_extension._get_cuda_arch_flags(flags) == ["-gencode=arch=compute_90,code=sm_90"]


def test_torch_architecture_names():
    assert build.arch_list_of(["sm_80", "sm_90a", "sm_100", "compute_120", "sm_120"]) == "8.0;9.0a;10.0;12.0+PTX"
    assert build.gencode_flags("8.0;9.0a 12.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_120,code=sm_120", "-gencode=arch=compute_120,code=compute_120"]
    with pytest.raises(ValueError, match="sm_9x"):
        build.arch_list_of(["sm_9x"])
    with pytest.raises(RuntimeError, match="set TORCH_CUDA_ARCH_LIST"):
        build.cuda_arch_list({}, [])


def fake_nvcc(folder: Path, body: str) -> Path:
    nvcc = folder / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n" + body + "\n")
    nvcc.chmod(0o755)
    return nvcc


def test_cuda_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """The nvcc on PATH may be a script outside the toolkit that runs the real one (as
    /usr/local/bin/nvcc does on the project's machines): the toolkit is where nvcc says it runs
    from, not the folder above the script (torch's guess)."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    # The real nvcc's dry run names its toolkit as TOP=<toolkit>/bin/.. (on stderr).
    real = fake_nvcc(toolkit, f'echo "#\\$ TOP={toolkit}/bin/.." >&2')
    wrapper = fake_nvcc(tmp_path / "local", f'exec {real} "$@"')
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    env = {"PATH": f"{wrapper.parent}{os.pathsep}/usr/bin:/bin"}
    assert not build.is_cuda_toolkit(wrapper.parent.parent)   # torch's guess
    assert build.find_cuda_home(env) == str(toolkit)
    assert build.find_cuda_home({**env, "CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"   # the user's choice stands
    # A link to the real nvcc: the folder above the file it points to.
    link = tmp_path / "links" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    assert build.find_cuda_home({"PATH": str(link.parent)}) == str(toolkit)


def test_build_on_first_use_keeps_the_cpu_kernels_when_cuda_fails(monkeypatch, capsys):
    """The CUDA part fails to compile: the CPU kernels are built alone, and the reason is kept for
    the 'cuda' backend's message."""
    compiled = []

    def compile_(cpp, with_cuda, nvcc_flags):
        compiled.append(with_cuda)
        if with_cuda:
            raise RuntimeError("Error building extension 'fusedloss_ops_cuda':\n...\nnvcc fatal : Unsupported gpu architecture 'compute_75'")

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(extension, "cuda_build_plan", lambda: ("7.5;9.0", None))
    monkeypatch.setattr(extension, "_compile", compile_)
    monkeypatch.setattr(extension, "_state", {**extension._state, "no_cuda": None})
    extension._jit_build()
    assert compiled == [True, False]
    assert "Unsupported gpu architecture" in extension.no_cuda_reason()
    err = capsys.readouterr().err
    assert err.count("compiling it now with ninja") == 1
    assert "building the CPU kernels alone" in err and "Unsupported gpu architecture" in err
    from fusedloss import backends

    monkeypatch.setattr(extension, "has_kernel", lambda op, key: key != "CUDA")
    monkeypatch.setattr(extension, "load", lambda: True)
    reason = backends.unavailable_reason("cuda", "cuda")
    assert "without CUDA kernels" in reason and "Unsupported gpu architecture" in reason
    # No toolkit: the CPU kernels alone, and why.
    compiled.clear()
    monkeypatch.setattr(extension, "cuda_build_plan", lambda: (None, "no CUDA toolkit was found"))
    extension._jit_build()
    assert compiled == [False] and extension.no_cuda_reason() == "no CUDA toolkit was found"
    assert "building the CPU kernels alone: no CUDA toolkit was found" in capsys.readouterr().err


def test_nvrtc_from_the_toolkit_else_from_torchs_wheels(tmp_path):
    """CMake links NVRTC through Torch's package: a toolkit installed without it (only nvcc and the
    runtime) takes the copy torch's CUDA wheels put beside torch."""
    toolkit, site = tmp_path / "cuda", tmp_path / "site-packages"
    (toolkit / "lib64").mkdir(parents=True)
    (site / "torch").mkdir(parents=True)
    wheel = site / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    for name in ("libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13", "libnvrtc.so.13"):
        (wheel / name).write_text("")
    assert build.nvrtc_library(str(toolkit), str(site / "torch")) == str(wheel / "libnvrtc.so.13")
    (toolkit / "lib64" / "libnvrtc.so").write_text("")
    assert build.nvrtc_library(str(toolkit), str(site / "torch")) == str(toolkit / "lib64" / "libnvrtc.so")
    assert build.nvrtc_library(None, str(tmp_path / "elsewhere" / "torch")) is None
