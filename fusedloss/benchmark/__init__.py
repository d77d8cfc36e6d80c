"""Benchmark harness shared by every loss family (``bench/run.py``, ``python -m fusedloss bench``).

A family module (e.g. ``fusedloss.benchmark.pva``) lists ``Case``s: a problem size, the bytes a
fused pass must move, and a function making the inputs. The harness runs, in one process and one
run, every available backend against the reference, each eagerly and under ``torch.compile``, for
three phases: forward, backward (of a retained graph) and forward+backward. It reports the median
time, the peak extra memory (CUDA only: PyTorch tracks no CPU allocations), the achieved
bandwidth (the case's bytes / time) and its fraction of the device's measured copy bandwidth,
and the speed-up against the reference run eagerly and compiled.

Timing: CUDA with ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); CPU with
``torch.utils.benchmark.Timer.blocked_autorange``.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import backends

PHASES = ("forward", "backward", "full")


@dataclass
class Case:
    """One problem of a family.

    make(device, dtype) -> (inputs, loss) with ``loss(inputs, backend) -> scalar tensor``; the
    first input is the one that requires grad. ``elements`` maps a phase to the number of
    input-dtype elements a fused implementation must move (reads + writes) for it. ``runs(backend,
    mode, device)``, if given, says whether a backend runs the case at all (e.g. a reference that
    would not fit in memory). ``baselines`` are further plain-PyTorch formulations that ``loss``
    accepts as a backend name, timed like the reference (eager and compiled) for comparison.
    """

    family: str
    name: str
    make: Callable
    elements: dict
    runs: Callable | None = None
    baselines: tuple[str, ...] = ()


@dataclass
class Result:
    family: str
    case: str
    backend: str
    mode: str  # "eager" | "compile"
    phase: str
    median_ms: float
    peak_mib: float | None
    gbps: float
    copy_fraction: float | None = None
    vs_eager_reference: float | None = None
    vs_compiled_reference: float | None = None
    baseline: bool = False  # a plain-PyTorch formulation other than the reference


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def file_stem(device: torch.device) -> str:
    """Results file name after the device, e.g. ``NVIDIA-H100-80GB-HBM3`` or ``cpu-x86_64-2-threads``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{torch.get_num_threads()}-threads"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def median_seconds(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> float:
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        except ImportError:
            pass
    from torch.utils.benchmark import Timer

    fn()  # warm-up (compilation, caches)
    timer = Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth(device: torch.device, mib: int = 512) -> float:
    """The device's copy bandwidth in bytes/s (bytes read + bytes written), measured now."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, min_run_time=0.2)
    return 2 * src.numel() * src.element_size() / seconds


def phase_functions(case: Case, backend: str, mode: str, device: torch.device, dtype: torch.dtype):
    """{phase: zero-argument callable} for a case on one backend, eager or compiled."""
    inputs, loss = case.make(device, dtype)
    first = inputs[0]

    def compute(x):
        return loss((x,) + tuple(inputs[1:]), backend)

    if mode == "compile":
        torch._dynamo.reset()
        # The backward phase replays a retained graph, which donated backward buffers forbid.
        torch._functorch.config.donated_buffer = False
        compute = torch.compile(compute, fullgraph=True, dynamic=False)
    leaf = first.detach().requires_grad_()

    def forward():
        with torch.no_grad():
            return compute(first)

    out = compute(leaf)

    def backward():
        return torch.autograd.grad(out, (leaf,), retain_graph=True)

    def full():
        return torch.autograd.grad(compute(leaf), (leaf,))

    return {"forward": forward, "backward": backward, "full": full}


def concrete_backends(device: torch.device) -> list[str]:
    """The fused backends that run on this device (the interpreted Triton one is not benchmarked)."""
    out = []
    for backend in ("cuda", "triton", "cpu"):
        if backend == "triton" and device.type == "cpu":
            continue
        if backends.unavailable_reason(backend, device.type) is None:
            out.append(backend)
    return out


def run_cases(
    cases: list[Case],
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    modes: tuple[str, ...] = ("eager", "compile"),
    phases: tuple[str, ...] = PHASES,
    reference_compile: bool = True,
    min_run_time: float = 0.5,
    copy_mib: int = 512,
    log: Callable[[str], None] = print,
    after_case: Callable[[list[Result], float], None] | None = None,
) -> tuple[list[Result], float]:
    """Every case on every backend; ``after_case(results so far, bandwidth)`` after each case (the
    bench command writes its files there, so a run cut short keeps what it measured)."""
    bandwidth = copy_bandwidth(device, copy_mib)
    log(f"# {device_name(device)}: measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results: list[Result] = []
    for case in cases:
        rows = [("reference", "eager")]
        if reference_compile and "compile" in modes:
            rows.append(("reference", "compile"))
        rows += [(b, m) for b in case.baselines for m in modes]
        rows += [(b, m) for b in concrete_backends(device) for m in modes]
        for backend, mode in rows:
            if case.runs is not None and not case.runs(backend, mode, device):
                log(f"  {case.name} {backend}/{mode}: not run at this size")
                continue
            try:
                fns = phase_functions(case, backend, mode, device, dtype)
            except torch.OutOfMemoryError:
                log(f"  {case.name} {backend}/{mode}: out of memory, skipped")
                continue
            for phase in phases:
                seconds = median_seconds(fns[phase], device, min_run_time)
                peak = peak_extra_mib(fns[phase], device)
                moved = case.elements[phase] * dtype.itemsize
                results.append(Result(case.family, case.name, backend, mode, phase, seconds * 1e3, peak,
                                      moved / seconds / 1e9, copy_fraction=moved / seconds / bandwidth,
                                      baseline=backend in case.baselines))
                gbps = results[-1].gbps
                log(f"  {case.name:>22s} {backend:9s} {mode:7s} {phase:8s} {seconds * 1e3:9.3f} ms "
                    f"{gbps:8.1f} GB/s" + (f" {peak:8.1f} MiB" if peak is not None else ""))
            del fns
        _add_speedups(results)
        if after_case is not None:
            after_case(results, bandwidth)
    return results, bandwidth


def _add_speedups(results: list[Result]) -> None:
    base = {(r.case, r.phase, r.mode): r.median_ms for r in results if r.backend == "reference"}
    for r in results:
        eager = base.get((r.case, r.phase, "eager"))
        compiled = base.get((r.case, r.phase, "compile"))
        r.vs_eager_reference = eager / r.median_ms if eager else None
        r.vs_compiled_reference = compiled / r.median_ms if compiled else None


def markdown(results: list[Result], device: torch.device, bandwidth: float, dtype: torch.dtype, command: str) -> str:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    lines = [
        f"# fusedloss benchmark: {device_name(device)}",
        "",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {dtype}",
        f"- measured copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)",
        "- GB/s = bytes a fused pass must move / median time; x eager / x compile = speed-up over the "
        "reference run eagerly / under torch.compile, measured in the same run",
        f"- command: `{command}`",
    ]
    if device.type == "cpu":
        lines.append(
            "- CPU backward times at large B include the page faults of the freshly allocated gradient "
            "(glibc maps allocations above 32 MB anew each time); `THP_MEM_ALLOC_ENABLE=1` (huge pages) reduces them"
        )
    lines += [
        "",
        "| case | backend | mode | phase | median ms | x eager | x compile | GB/s | % copy BW | peak MiB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.case} | {r.backend} | {r.mode} | {r.phase} | {r.median_ms:.3f} | "
            f"{fmt(r.vs_eager_reference, '.2f')} | {fmt(r.vs_compiled_reference, '.2f')} | {r.gbps:.1f} | "
            f"{fmt(None if r.copy_fraction is None else 100 * r.copy_fraction, '.1f')} | {fmt(r.peak_mib, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def summary(results: list[Result], phase: str = "full") -> str:
    """One line per case: the best fused backend's speed-ups for a phase (and against the fastest
    plain-PyTorch baseline, where the case has baselines)."""
    lines = []
    for case in dict.fromkeys(r.case for r in results):
        fused = [r for r in results if r.case == case and r.phase == phase and r.backend != "reference"
                 and not r.baseline and r.mode == "eager"]
        if not fused:
            continue
        best = min(fused, key=lambda r: r.median_ms)
        eager_x = f"{best.vs_eager_reference:.1f}x" if best.vs_eager_reference else "-"
        compile_x = f"{best.vs_compiled_reference:.1f}x" if best.vs_compiled_reference else "-"
        line = (f"{case:>24s}: {best.backend:6s} {best.median_ms:8.3f} ms  {eager_x:>7s} vs eager, "
                f"{compile_x:>7s} vs torch.compile, {best.gbps:6.1f} GB/s")
        baselines = [r for r in results if r.case == case and r.phase == phase and r.baseline]
        if baselines:
            fastest = min(baselines, key=lambda r: r.median_ms)
            line += f", {fastest.median_ms / best.median_ms:.1f}x vs {fastest.backend} ({fastest.mode})"
        lines.append(line)
    return "\n".join(lines)


def write(results: list[Result], device: torch.device, bandwidth: float, dtype: torch.dtype, out_dir: Path,
          command: str, suffix: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (file_stem(device) + suffix)
    stem.with_suffix(".md").write_text(markdown(results, device, bandwidth, dtype, command))
    payload = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "command": command,
        "results": [asdict(r) for r in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return stem.with_suffix(".md")


__all__ = ["Case", "Result", "run_cases", "write", "markdown", "summary"]
