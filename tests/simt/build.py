"""Compile the project's CUDA kernels for the CPU (simt_cuda.h), with sanitizers.

Each ``csrc/<family>/*.cu`` file is compiled as C++ exactly as it is, with ``simt_cuda.h``
force-included and ``-DFUSEDLOSS_SIMT``, and linked into:

- ``kernels_module("asan")``: the Python module ``simt_kernels`` (``kernels.cpp``, pybind11), under
  AddressSanitizer + UndefinedBehaviorSanitizer; load it only in a process started with
  ``sanitizer_env("asan")`` (``worker.py`` does);
- ``kernels_module("trace")``: the same module with every global load and store of the kernels
  recorded (``trace.h``, ``traffic.py``); no runtime to preload;
- ``program("race_check", "tsan")``: the ThreadSanitizer driver (``race_check.cpp``; TSan cannot be
  loaded into CPython);
- ``program("selftest", variant)``: the emulator's own test kernels (``selftest.cu``).

Objects are cached under ``build/simt`` by the content of their source, of every header they can
include and of the flags, so an unchanged file is compiled once. ``FUSEDLOSS_SIMT_CSRC`` points the
build at another copy of ``csrc/`` (mutate.py plants bugs in one).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SIMT = Path(__file__).resolve().parent
ROOT = SIMT.parent.parent
CXX = os.environ.get("CXX", "g++")

# The flags torch.utils.cpp_extension gives nvcc: the kernels must not rely on what they switch off.
TORCH_CUDA_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
SANITIZERS = {
    # -ftrivial-auto-var-init=pattern fills uninitialised locals ("registers") with 0xFE bytes.
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-ftrivial-auto-var-init=pattern"],
    "tsan": ["-fsanitize=thread"],
}
# The "trace" build (trace.h): every load and store of the .cu files becomes a call of
# __tsan_{read,write}N(address), defined by trace.cpp (ThreadSanitizer's instrumentation, with no
# TSan runtime: unlike AddressSanitizer's, it does not skip a store to an address just loaded).
# The .cu files are optimised like nvcc's code (helpers inlined, loads not repeated), but not
# vectorised: a GPU thread's accesses stay its own. The uninstrumented host glue (kernels.cpp,
# trace.cpp) is built at -O1 like the other variants (-O2 costs about 40% more compile time there).
TRACE_OPTIMISATION = ["-O2", "-fno-tree-vectorize", "-fno-tree-slp-vectorize", "-DSIMT_TRACE"]
TRACE_GLUE = ["-O1", "-DSIMT_TRACE"]
TRACE_INSTRUMENTATION = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]


def csrc() -> Path:
    return Path(os.environ.get("FUSEDLOSS_SIMT_CSRC", ROOT / "csrc")).resolve()


def cuda_sources() -> list[Path]:
    return sorted(csrc().glob("*/*.cu"))


def build_dir() -> Path:
    return Path(os.environ.get("FUSEDLOSS_SIMT_BUILD", ROOT / "build" / "simt"))


@functools.cache
def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (the kernels include its runtime and fp16/bf16 headers)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").is_file():
            return Path(c) / "include"
    return None


def unavailable_reason() -> str | None:
    """Why the lane cannot build here, or None."""
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX})"
    if cuda_include() is None:
        return "the CUDA headers are not installed (set CUDA_HOME)"
    if not sys.platform.startswith("linux"):
        return "the sanitizer runtimes are set up for Linux only"
    return None


def runtime_library(name: str) -> str:
    """Path of a gcc sanitizer runtime, e.g. libasan.so."""
    return subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


def sanitizer_env(variant: str) -> dict[str, str]:
    """Environment of a process that loads ``variant`` code (ASan must be the first library loaded)."""
    env = dict(os.environ)
    if variant == "asan":
        env["LD_PRELOAD"] = f"{runtime_library('libasan.so')} {runtime_library('libubsan.so')}"
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:" + env.get("ASAN_OPTIONS", "")
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:" + env.get("UBSAN_OPTIONS", "")
    elif variant == "tsan":
        env["TSAN_OPTIONS"] = "halt_on_error=1:abort_on_error=1:" + env.get("TSAN_OPTIONS", "")
    return env


def _flags(variant: str, source: Path | None = None) -> list[str]:
    """Compiler flags of a variant; for the trace variant, the .cu files (``source``) are instrumented."""
    kernel = source is not None and source.suffix == ".cu"
    if variant == "trace":
        optimisation = TRACE_OPTIMISATION if kernel or source is None else TRACE_GLUE
    else:
        optimisation = ["-O1"]
    traced = TRACE_INSTRUMENTATION if variant == "trace" and kernel else []
    return ["-std=c++20", *optimisation, "-g", "-pthread", "-fno-omit-frame-pointer", "-fPIC", "-DFUSEDLOSS_SIMT",
            *TORCH_CUDA_DEFINES, *SANITIZERS.get(variant, []), *traced]


def _includes(extra: list[Path]) -> list[str]:
    # simt first: its cub/ stands in for CUDA's CUB.
    dirs = [SIMT, csrc(), cuda_include(), *extra]
    return [f"-I{d}" for d in dirs]


@functools.cache
def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


def _headers_digest() -> str:
    """Every header a translation unit can include from csrc/ and tests/simt/ (cheap, and exact)."""
    h = hashlib.sha256()
    for folder in (csrc(), SIMT):
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".h", ".cuh", ".hpp") and path.is_file():
                h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _compile(source: Path, variant: str, extra_includes: list[Path], headers: str) -> Path:
    flags = _flags(variant, source)
    language = ["-x", "c++"] if source.suffix == ".cu" else []
    parts = [_compiler_version(), headers, *flags, *language, *map(str, extra_includes)]
    key = hashlib.sha256("\0".join(parts).encode() + source.read_bytes()).hexdigest()[:20]
    out = build_dir() / variant / f"{source.stem}-{key}.o"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [CXX, *flags, *_includes(extra_includes), "-include", str(SIMT / "simt_cuda.h"), *language,
           "-c", str(source), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"simt: compiling {source} failed:\n{' '.join(cmd)}\n{result.stderr[-20000:]}")
    os.replace(tmp, out)
    return out


def _link(name: str, objects: list[Path], variant: str, shared: bool) -> Path:
    key = hashlib.sha256("\0".join(o.name for o in objects).encode()).hexdigest()[:20]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") if shared else ""
    out = build_dir() / variant / key / f"{name}{suffix}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [CXX, *_flags(variant), *(["-shared"] if shared else []), *map(str, objects), "-ldl", "-o", str(target)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"simt: linking {name} failed:\n{' '.join(cmd)}\n{result.stderr[-20000:]}")
        os.replace(target, out)
    return out


def _build(name: str, sources: list[Path], variant: str, *, shared: bool, extra_includes=()) -> Path:
    headers = _headers_digest()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(lambda s: _compile(s, variant, list(extra_includes), headers), sources))
    return _link(name, objects, variant, shared)


def kernels_module(variant: str = "asan") -> Path:
    """The pybind11 module ``simt_kernels``: the three families' host launch functions (with the
    access recorder of trace.h in the "trace" variant, which needs no preloaded runtime)."""
    import pybind11

    includes = [Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"])]
    recorder = [SIMT / "trace.cpp"] if variant == "trace" else []
    return _build("simt_kernels", [SIMT / "kernels.cpp", *recorder, *cuda_sources()], variant, shared=True,
                  extra_includes=includes)


def program(name: str, variant: str) -> Path:
    """An executable from ``tests/simt/<name>.cpp`` (or ``.cu``), with the kernels for race_check."""
    main = SIMT / f"{name}.cpp" if (SIMT / f"{name}.cpp").is_file() else SIMT / f"{name}.cu"
    sources = [main, *cuda_sources()] if name == "race_check" else [main]
    return _build(f"{name}-{variant}", sources, variant, shared=False)


if __name__ == "__main__":  # python tests/simt/build.py: build everything, print the paths
    print(kernels_module("asan"))
    print(program("race_check", "tsan"))
