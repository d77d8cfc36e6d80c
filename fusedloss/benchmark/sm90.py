"""Machine-code facts of the kernels for an H100/H200 (sm_90), read on a machine without a GPU.

CUDA    every csrc/<family>/*_cuda.cu is compiled with ``nvcc -arch=sm_90 -cubin -Xptxas -v``: the
        resource report gives each kernel instance's registers, spill bytes, stack frame and static
        shared memory; ``cuobjdump -sass`` of the cubin gives its global loads and stores by width.
Triton  each kernel variant a launch used is compiled by Triton's own compiler for sm_90
        (``triton.compile``, as tests/triton_sm90_compile.py does), in a subprocess without
        TRITON_INTERPRET; ``ptxas -v`` on its PTX gives the same report, cuobjdump its SASS.
Both give the theoretical occupancy from the architecture's limits (``SM90`` below).

cuobjdump and ptxas ship in the Triton wheel (triton/backends/nvidia/bin); nvcc is the CUDA
toolkit's. Results are cached under build/model by the content of what was compiled.

    python -m fusedloss.benchmark.sm90 --cuda            # the CUDA kernels' facts as JSON
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one architecture, for the theoretical occupancy."""

    name: str
    max_threads: int
    max_warps: int
    max_blocks: int
    registers: int             # 32-bit registers per SM
    register_unit: int         # registers are allocated per warp in units of this many
    max_registers_per_thread: int
    shared_bytes: int          # shared memory per SM (largest carveout)
    shared_per_block: int      # the most one block may use
    shared_reserved: int       # shared memory the system reserves per block
    shared_unit: int           # allocation granularity
    source: str


# Compute capability 9.0 (H100, H200): CUDA C++ Programming Guide, "Compute Capabilities", table
# "Technical Specifications per Compute Capability" (max resident blocks 32, warps 64, threads 2048,
# 64K 32-bit registers, 255 per thread, 228 KB shared memory per SM, 227 KB per block, 1 KB reserved
# per block), and CUDA's occupancy calculator for the allocation units (256 registers per warp,
# 128 bytes of shared memory).
SM90 = ArchLimits("sm_90", max_threads=2048, max_warps=64, max_blocks=32, registers=65536, register_unit=256,
                  max_registers_per_thread=255, shared_bytes=228 * 1024, shared_per_block=227 * 1024,
                  shared_reserved=1024, shared_unit=128,
                  source="CUDA C++ Programming Guide, Technical Specifications per Compute Capability (9.0); "
                         "CUDA occupancy calculator allocation units")


def occupancy(registers: int, threads: int, shared: int, arch: ArchLimits = SM90) -> tuple[int, float, str]:
    """(resident blocks per SM, occupancy = resident warps / max warps, the limiting resource)."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / arch.register_unit) * arch.register_unit
    limits = {
        "blocks": arch.max_blocks,
        "warps": arch.max_warps // warps,
        "registers": (arch.registers // regs_per_warp) // warps,
        "shared": arch.shared_bytes // (math.ceil((shared + arch.shared_reserved) / arch.shared_unit)
                                        * arch.shared_unit),
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return blocks, blocks * warps / arch.max_warps, limiter


@dataclass
class KernelFacts:
    """One compiled kernel instance."""

    name: str                       # e.g. pva_forward_kernel<float>
    registers: int = 0
    spill_stores: int = 0           # bytes (ptxas)
    spill_loads: int = 0
    stack_frame: int = 0            # bytes of local memory per thread
    shared: int = 0                 # static + dynamic shared memory per block
    threads: int = 0                # per block (CUDA: from the launch; Triton: num_warps * 32)
    global_loads: dict = field(default_factory=dict)   # width in bits -> SASS instructions
    global_stores: dict = field(default_factory=dict)
    local_accesses: int = 0         # LDL/STL instructions

    @property
    def loads_128(self) -> int:
        return self.global_loads.get("128", 0)

    @property
    def loads_narrow(self) -> int:
        return sum(v for k, v in self.global_loads.items() if k != "128")

    def occupancy(self, threads: int | None = None) -> tuple[int, float, str]:
        return occupancy(self.registers, threads or self.threads or 256, self.shared)

    def summary(self) -> dict:
        blocks, occ, limiter = self.occupancy()
        return {**asdict(self), "loads_128": self.loads_128, "loads_narrow": self.loads_narrow,
                "blocks_per_sm": blocks, "occupancy": occ, "occupancy_limiter": limiter}


# ---- tools -------------------------------------------------------------------------------------------

def _triton_bin(tool: str) -> str | None:
    try:
        import triton
    except ImportError:
        return shutil.which(tool)
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(path) if path.is_file() else shutil.which(tool)


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return str(Path(home) / "bin" / "nvcc") if (Path(home) / "bin" / "nvcc").is_file() else None


def unavailable_reason(backend: str) -> str | None:
    if _triton_bin("cuobjdump") is None:
        return "cuobjdump not found (it ships in the Triton wheel)"
    if backend == "cuda" and nvcc() is None:
        return "nvcc not found (the CUDA toolkit)"
    if backend == "triton" and _triton_bin("ptxas") is None:
        return "ptxas not found (it ships in the Triton wheel)"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("FUSEDLOSS_MODEL_CACHE", ROOT / "build" / "model"))


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_name(demangled: str) -> str:
    """``pva_forward_kernel<float>`` from a demangled signature (Triton's names are already short)."""
    m = re.search(r"(\w+_kernel)(<[^()]*>)?\(", demangled)
    return (m.group(1) + (m.group(2) or "")) if m else demangled


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled entry: registers, spill stores/loads, stack frame, static shared memory."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                                  "stack_frame": 0, "shared": 0})
            continue
        if current is None:
            continue
        m = _PTXAS_STACK.search(line)
        if m:
            current["stack_frame"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["shared"] = int(m.group(2) or 0)
    return out


_SASS_FUNCTION = re.compile(r"Function : (\S+)")
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _width(opcode: str) -> str:
    parts = opcode.split(".")[1:]
    for p in parts:
        if p in ("128", "64"):
            return p
        if p in ("U16", "S16"):
            return "16"
        if p in ("U8", "S8"):
            return "8"
    return "32"


def parse_sass(sass: str) -> dict[str, dict]:
    """Per mangled function: global loads and stores by width (bits), local-memory instructions."""
    out: dict[str, dict] = {}
    current = None
    for line in sass.splitlines():
        m = _SASS_FUNCTION.search(line)
        if m:
            current = out.setdefault(m.group(1), {"global_loads": {}, "global_stores": {}, "local_accesses": 0})
            continue
        if current is None:
            continue
        m = _SASS_INSTRUCTION.search(line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base in ("LDG", "LD"):
            d = current["global_loads"]
            d[_width(op)] = d.get(_width(op), 0) + 1
        elif base in ("STG", "ST"):
            d = current["global_stores"]
            d[_width(op)] = d.get(_width(op), 0) + 1
        elif base in ("LDL", "STL"):
            current["local_accesses"] += 1
    return out


def _facts(ptxas: dict, sass: dict) -> dict[str, KernelFacts]:
    mangled = sorted(set(ptxas) | set(sass))
    names = _demangle(mangled)
    out = {}
    for m, demangled in zip(mangled, names):
        f = KernelFacts(short_name(demangled), **ptxas.get(m, {}), **sass.get(m, {}))
        out[f.name] = f
    return out


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return result


def _cached(key: str, compute) -> dict:
    path = cache_dir() / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return value


# ---- CUDA ------------------------------------------------------------------------------------------

# The flags torch.utils.cpp_extension gives nvcc (setup.py builds the kernels with them).
NVCC_FLAGS = ["-arch=sm_90", "-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
OUR_KERNELS = re.compile(r"^(pva|blendshape|score)_\w+_kernel")


def _sources_digest(csrc: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc.rglob("*")):
        if path.is_file() and path.suffix in (".cu", ".cuh", ".h"):
            h.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


def cuda_facts(csrc: Path | None = None) -> dict[str, KernelFacts]:
    """Facts of every kernel instance of csrc/*/*_cuda.cu (CUB's own kernels left out)."""
    csrc = Path(csrc or os.environ.get("FUSEDLOSS_SIMT_CSRC", ROOT / "csrc"))
    compiler, cuobjdump = nvcc(), _triton_bin("cuobjdump")

    def one(source: Path) -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / (source.stem + ".cubin")
            log = _run([compiler, *NVCC_FLAGS, "-cubin", "-Xptxas", "-v", f"-I{csrc}", "-o", str(cubin),
                        str(source)]).stderr
            return log, _run([cuobjdump, "-sass", str(cubin)]).stdout

    def compute():
        from concurrent.futures import ThreadPoolExecutor

        version = _run([compiler, "--version"]).stdout
        out = {}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for log, sass in pool.map(one, sorted(csrc.glob("*/*_cuda.cu"))):
                for name, f in _facts(parse_ptxas(log), parse_sass(sass)).items():
                    if OUR_KERNELS.match(name):
                        out[name] = asdict(f)
        return {"nvcc": version.strip().splitlines()[-1], "kernels": out}

    key = "cuda-" + hashlib.sha256((_sources_digest(csrc) + " ".join(NVCC_FLAGS)).encode()).hexdigest()[:20]
    data = _cached(key, compute)
    return {name: KernelFacts(**f) for name, f in data["kernels"].items()}


# ---- Triton ----------------------------------------------------------------------------------------

def _triton_compile_one(spec: dict) -> dict:
    """Compile one launch's kernel variant for sm_90 (in a process without TRITON_INTERPRET)."""
    import importlib

    import triton
    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, kind, value) in enumerate(spec["args"]):
        if kind in ("pointer", "pointer16"):
            signature[name] = value
            if kind == "pointer16":
                attrs[(index,)] = CUDABackend.parse_attr("D")
        elif kind == "constexpr":
            signature[name] = "constexpr"
            constexprs[name] = tl.dtype(value[len("tl."):]) if isinstance(value, str) and value.startswith("tl.") \
                else value
        else:
            # as Triton's JIT specialises an int: 1 a constexpr, a multiple of 16 marked divisible by 16
            ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = value
            elif isinstance(key, str) and key:
                attrs[(index,)] = CUDABackend.parse_attr(key)
    binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=spec.get("options") or None)
    return asdict(facts_of_binary(spec["kernel"], binary))


def facts_of_binary(name: str, binary) -> KernelFacts:
    """Facts of a Triton ``CompiledKernel`` for sm_90: ptxas -v on its PTX, cuobjdump on its cubin."""
    ptxas, cuobjdump = _triton_bin("ptxas"), _triton_bin("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(binary.asm["ptx"])
        log = _run([ptxas, "-v", "--gpu-name=sm_90a", "--regAllocOptLevel=2", str(ptx), "-o", str(cubin)]).stderr
        (Path(tmp) / "t.cubin").write_bytes(binary.asm["cubin"])
        sass = _run([cuobjdump, "-sass", str(Path(tmp) / "t.cubin")]).stdout
    report = parse_ptxas(log)
    entry = next(iter(report.values()), {})
    code = parse_sass(sass)
    f = KernelFacts(name, **entry, **next(iter(code.values()), {}))
    f.shared = max(f.shared, int(binary.metadata.shared))
    f.threads = 32 * int(binary.metadata.num_warps)
    return f


def triton_facts(specs: list[dict]) -> list[KernelFacts]:
    """Facts of the Triton kernel variants ``specs`` (TritonLaunch.spec), compiled in one
    subprocess (each distinct variant once); cached by spec and the kernels' source file."""
    paths = []
    todo: dict = {}  # cache file -> the spec to compile (each distinct variant once)
    for spec in specs:
        source = Path(sys.modules[spec["module"]].__file__).read_bytes() if spec["module"] in sys.modules else b""
        key = "triton-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + source).hexdigest()[:20]
        path = cache_dir() / f"{key}.json"
        paths.append(path)
        if not path.is_file():
            todo[path] = spec
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(list(todo.values()), f)
        result = subprocess.run([sys.executable, "-m", "fusedloss.benchmark.sm90", "--triton", f.name],
                                capture_output=True, text=True, env=env, cwd=ROOT)
        os.unlink(f.name)
        if result.returncode != 0:
            raise RuntimeError(f"compiling Triton kernels for sm_90 failed:\n{result.stderr[-6000:]}")
        compiled = json.loads(result.stdout.splitlines()[-1])
        for path, facts in zip(todo, compiled):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(facts))
            os.replace(tmp, path)
    return [KernelFacts(**json.loads(path.read_text())) for path in paths]


def triton_variants() -> list[dict]:
    """Facts of every Triton kernel variant tests/triton_sm90_compile.py compiles (each launcher's
    real arguments over dtypes, shapes and options), with its input dtype."""
    script = ROOT / "tests" / "triton_sm90_compile.py"
    if not script.is_file():
        raise RuntimeError(f"{script} is not here (a source checkout has it)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "facts.json"
        result = subprocess.run([sys.executable, str(script), "--facts", str(out)], capture_output=True, text=True,
                                env=env, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{script.name} failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def summarize_variants(variants: list[dict]) -> list[dict]:
    """Per (kernel, input dtype): how many variants, registers (median, max), spill bytes (max),
    variants with a 128-bit load, occupancy (min, median)."""
    import statistics

    groups: dict = {}
    for v in variants:
        groups.setdefault((v["name"], v["dtype"]), []).append(v)
    out = []
    for (name, dtype), vs in sorted(groups.items()):
        regs = [v["registers"] for v in vs]
        occ = [v["occupancy"] for v in vs]
        out.append({"kernel": name, "dtype": dtype, "variants": len(vs), "registers_median": statistics.median(regs),
                    "registers_max": max(regs),
                    "spill_bytes_max": max(v["spill_stores"] + v["spill_loads"] for v in vs),
                    "with_128bit_loads": sum(1 for v in vs if v["loads_128"]),
                    "narrow_loads_median": statistics.median(v["loads_narrow"] for v in vs),
                    "occupancy_min": min(occ), "occupancy_median": statistics.median(occ)})
    return out


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="print the CUDA kernels' facts")
    parser.add_argument("--triton", metavar="SPECS.json", help="compile these Triton launch specs, print JSON")
    args = parser.parse_args(argv)
    if args.triton:
        specs = json.loads(Path(args.triton).read_text())
        print(json.dumps([_triton_compile_one(s) for s in specs]))
    if args.cuda:
        for name, f in cuda_facts().items():
            print(json.dumps(f.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
