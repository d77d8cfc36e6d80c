"""Benchmark harness shared by every loss family (``bench/run.py``, ``python -m fusedloss bench``).

A family module (e.g. ``fusedloss.benchmark.pva``) lists ``Case``s: a problem size, the bytes a
fused pass must move, and a function making the inputs. The harness runs, in one process and one
run, every available backend against the reference, each eagerly and under ``torch.compile``, for
three phases: forward, backward (of a retained graph) and forward+backward. On the CPU it does so
with 1 thread and with all of them (``threads``), side by side. It reports:

- the median time of the phase as a training step pays it;
- ``alloc ms`` (CPU, glibc): what the phase's fresh gradient costs to allocate, i.e. its page faults:
  its time less its time under ``caching_malloc`` (every block reused, as a caching allocator does).
  The run fixes glibc's malloc at the state a long-running process reaches (``steady_malloc``):
  blocks above 32 MB are mapped anew, and page-faulted, on every call;
- the bandwidth: the case's bytes over the time less ``alloc ms`` (the kernels' own time), in GB/s
  and as a fraction of "copy": plain PyTorch passes that read and write as many bytes as the case
  (``c = a + b`` for what it writes and two bytes read per byte written, a ``sum`` for the other
  reads; ``traffic_seconds``), timed in the same run with the same threads, so that a case that fits
  in a cache is compared with passes that fit in it too, and reads with reads;
- the peak extra memory (CUDA only: PyTorch tracks no CPU allocations) and the speed-up against the
  reference run eagerly and compiled.

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
    input-dtype elements a fused implementation must move (reads + writes) for it, ``writes`` to
    how many of them it writes. ``runs(backend,
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
    writes: dict | None = None  # of ``elements``, those written per phase (the rest are read); None: none


@dataclass
class Result:
    family: str
    case: str
    backend: str
    mode: str  # "eager" | "compile"
    phase: str
    median_ms: float  # as a training step pays it, allocation included
    peak_mib: float | None
    gbps: float  # the case's bytes / (median_ms - alloc_ms)
    copy_fraction: float | None = None  # copy_ms / (median_ms - alloc_ms)
    vs_eager_reference: float | None = None
    vs_compiled_reference: float | None = None
    baseline: bool = False  # a plain-PyTorch formulation other than the reference
    threads: int | None = None  # CPU threads (None on CUDA)
    alloc_ms: float | None = None  # page faults of the phase's fresh gradient (CPU)
    copy_ms: float | None = None  # plain passes with the case's reads and writes, same run, same threads


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


def file_stem(device: torch.device, threads: tuple[int, ...] | None = None) -> str:
    """Results file name after the device, e.g. ``NVIDIA-H100-80GB-HBM3`` or ``cpu-x86_64-2-threads``
    (``cpu-x86_64-1-2-threads`` for a table of 1 and 2 threads)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        counts = threads or (torch.get_num_threads(),)
        name = f"cpu-{platform.machine()}-{'-'.join(map(str, counts))}-threads"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def thread_counts(device: torch.device) -> tuple[int | None, ...]:
    """The CPU thread counts a run measures: 1 and all of them (None: the GPU's one setting)."""
    if device.type != "cpu":
        return (None,)
    return tuple(sorted({1, torch.get_num_threads()}))


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
    """The device's copy bandwidth in bytes/s (bytes read + bytes written) on a buffer larger than
    its caches, measured now."""
    return 2 * mib * 2**20 / copy_seconds(2 * mib * 2**20, device, min_run_time=0.2)


def copy_seconds(nbytes: int, device: torch.device, min_run_time: float = 0.1) -> float:
    """Median time of a copy that moves ``nbytes`` (reads half, writes half), into a reused buffer."""
    return traffic_seconds(nbytes // 2, nbytes // 2, device, min_run_time)


def traffic_seconds(read: int, written: int, device: torch.device, min_run_time: float = 0.1) -> float:
    """Median time of plain PyTorch passes that read ``read`` bytes and write ``written`` bytes into
    reused buffers, the yardstick of a fused pass with that traffic: ``c = a + b`` (2 bytes read per
    byte written) or ``c.copy_(a)`` (1 per 1) for the written bytes, a ``sum`` for the other reads."""
    n = max(written // 4, 0)  # float32 elements written
    passes = []
    if n and read >= 2 * written:
        a, b, c = (torch.ones(n, device=device) for _ in range(3))
        passes.append(lambda: torch.add(a, b, out=c))
        read -= 2 * written
    elif n:
        a, c = torch.ones(n, device=device), torch.zeros(n, device=device)
        passes.append(lambda: c.copy_(a))
        read = max(read - written, 0)
    if read >= 4 or not passes:
        x = torch.ones(max(read // 4, 1), device=device)
        passes.append(lambda: x.sum())
    return median_seconds(lambda: [fn() for fn in passes], device, min_run_time)


# glibc's malloc settings (mallopt's parameters), for the allocation column.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's own dynamic threshold stops rising


def _glibc():
    """The C library when it is glibc (``mallopt`` and ``malloc_trim``), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (present: glibc)
        return libc
    except (OSError, AttributeError):
        return None


def steady_malloc() -> bool:
    """Fixes glibc's malloc at the state a process that runs one phase in a loop reaches by itself
    (blocks above 32 MB mapped anew, and page-faulted, on every allocation; smaller blocks reused)
    and returns the free memory (``malloc_trim``), so that a measurement does not depend on what
    ran before it. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
    libc.malloc_trim(0)
    return True


class caching_malloc:
    """A context in which glibc's malloc keeps and reuses every block (no memory mapped anew, none
    returned), as a caching allocator does: fresh tensors cost no page faults. Then back to
    ``steady_malloc``'s settings, returning the kept memory."""

    def __enter__(self):
        self.libc = _glibc()
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_MAX, 0)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        return self

    def __exit__(self, *exc):
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_MAX, 65536)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
            self.libc.malloc_trim(0)


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
    threads: tuple[int | None, ...] | None = None,
    log: Callable[[str], None] = print,
    after_case: Callable[[list[Result], float], None] | None = None,
) -> tuple[list[Result], float]:
    """Every case on every backend, with each of ``threads`` (default ``thread_counts``: 1 and all
    CPU threads); ``after_case(results so far, bandwidth)`` after each case (the bench command
    writes its files there, so a run cut short keeps what it measured). ``bandwidth``: the copy
    bandwidth of a buffer of ``copy_mib`` MiB, for the header."""
    counts = thread_counts(device) if threads is None else threads
    all_threads = torch.get_num_threads()
    steady = device.type == "cpu" and steady_malloc()
    bandwidth = copy_bandwidth(device, copy_mib)
    log(f"# {device_name(device)}: measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results: list[Result] = []
    try:
        for case in cases:
            rows = [("reference", "eager")]
            if reference_compile and "compile" in modes:
                rows.append(("reference", "compile"))
            rows += [(b, m) for b in case.baselines for m in modes]
            rows += [(b, m) for b in concrete_backends(device) for m in modes]
            for count in counts:
                if count is not None:
                    torch.set_num_threads(count)
                copies = {}  # phase -> seconds of a copy of its bytes, the same for every backend
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
                        moved = case.elements[phase] * dtype.itemsize
                        if phase not in copies:
                            written = (case.writes or {}).get(phase, 0) * dtype.itemsize
                            copies[phase] = traffic_seconds(moved - written, written, device, min_run_time)
                        copy = copies[phase]
                        if steady:
                            steady_malloc()  # (returns the memory earlier rows left free)
                        seconds = median_seconds(fns[phase], device, min_run_time)
                        peak = peak_extra_mib(fns[phase], device)
                        # The same phase with every block of memory reused: without the page faults of
                        # its fresh gradient (the forward allocates none).
                        kernels = seconds
                        if steady and phase != "forward":
                            with caching_malloc():
                                kernels = min(seconds, median_seconds(fns[phase], device, min_run_time))
                        alloc = seconds - kernels
                        results.append(Result(case.family, case.name, backend, mode, phase, seconds * 1e3, peak,
                                              moved / kernels / 1e9, copy_fraction=copy / kernels,
                                              baseline=backend in case.baselines, threads=count,
                                              alloc_ms=alloc * 1e3 if steady else None,
                                              copy_ms=copy * 1e3))
                        r = results[-1]
                        log(f"  {case.name:>22s} {backend:9s} {mode:7s} {phase:8s}"
                            + (f" {count}T" if count is not None else "")
                            + f" {seconds * 1e3:9.3f} ms {r.gbps:8.1f} GB/s {100 * r.copy_fraction:6.1f}% copy"
                            + (f" {peak:8.1f} MiB" if peak is not None else ""))
                    del fns
            _add_speedups(results)
            if after_case is not None:
                after_case(results, bandwidth)
    finally:
        torch.set_num_threads(all_threads)
    return results, bandwidth


def _add_speedups(results: list[Result]) -> None:
    base = {(r.case, r.phase, r.mode, r.threads): r.median_ms for r in results if r.backend == "reference"}
    for r in results:
        eager = base.get((r.case, r.phase, "eager", r.threads))
        compiled = base.get((r.case, r.phase, "compile", r.threads))
        r.vs_eager_reference = eager / r.median_ms if eager else None
        r.vs_compiled_reference = compiled / r.median_ms if compiled else None


def markdown(results: list[Result], device: torch.device, bandwidth: float, dtype: torch.dtype, command: str) -> str:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    counts = list(dict.fromkeys(r.threads for r in results)) or [None]
    lines = [
        f"# fusedloss benchmark: {device_name(device)}",
        "",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {dtype}",
        "- ms: median time of the phase; x eager / x compile: speed-up over the reference run eagerly / under "
        "torch.compile in the same run" + (", with the same threads" if device.type == "cpu" else ""),
        "- GB/s: bytes a fused pass must move / (ms - alloc ms); % copy: plain PyTorch passes that read and write "
        "as many bytes (`c = a + b` for the bytes written, `sum` for the other reads), timed in the same run with the "
        "same threads, / (ms - alloc ms): about 100 for a pass that moves its bytes once at the rate PyTorch's own "
        "elementwise kernels do",
        f"- copy bandwidth on buffers larger than the caches: {bandwidth / 1e9:.1f} GB/s (read + write)",
        f"- command: `{command}`",
    ]
    if device.type == "cpu":
        lines.append(
            "- alloc ms: the page faults of the phase's fresh gradient: ms less the same phase's time with "
            "glibc's malloc reusing every block (as a caching allocator does). glibc maps blocks above 32 MB anew, "
            "page-faulted, on every call; `THP_MEM_ALLOC_ENABLE=1` (huge pages) makes that cheaper and a caching "
            "malloc removes it: README, \"CPU performance\""
        )

    def label(count, name):
        return name if count is None else f"{name} {count}T"
    names = ("ms", "alloc ms", "x eager", "x compile", "GB/s", "% copy")
    if device.type != "cpu":
        names = ("ms", "x eager", "x compile", "GB/s", "% copy")
    header = [label(c, n) for n in names for c in counts]
    lines += [
        "",
        "| case | backend | mode | phase | " + " | ".join(header) + " | peak MiB |",
        "|---|---|---|---|" + "---:|" * (len(header) + 1),
    ]
    rows: dict = {}
    for r in results:
        rows.setdefault((r.case, r.backend, r.mode, r.phase), {})[r.threads] = r
    for (case, backend, mode, phase), by_count in rows.items():
        cells = []
        for field in names:
            for count in counts:
                r = by_count.get(count)
                if r is None:
                    cells.append("-")
                elif field == "ms":
                    cells.append(f"{r.median_ms:.3f}")
                elif field == "alloc ms":
                    cells.append(fmt(r.alloc_ms, ".3f"))
                elif field == "x eager":
                    cells.append(fmt(r.vs_eager_reference, ".2f"))
                elif field == "x compile":
                    cells.append(fmt(r.vs_compiled_reference, ".2f"))
                elif field == "GB/s":
                    cells.append(f"{r.gbps:.1f}")
                else:
                    cells.append(fmt(None if r.copy_fraction is None else 100 * r.copy_fraction, ".1f"))
        first = next(iter(by_count.values()))
        lines.append(f"| {case} | {backend} | {mode} | {phase} | " + " | ".join(cells) + f" | {fmt(first.peak_mib, '.1f')} |")
    return "\n".join(lines) + "\n"


def summary(results: list[Result], phase: str = "full") -> str:
    """One line per case: the best fused backend's speed-ups for a phase (and against the fastest
    plain-PyTorch baseline, where the case has baselines)."""
    lines = []
    most = max((r.threads for r in results if r.threads is not None), default=None)
    results = [r for r in results if r.threads == most]  # (all the CPU's threads)
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
    counts = tuple(dict.fromkeys(r.threads for r in results if r.threads is not None)) or None
    stem = out_dir / (file_stem(device, counts) + suffix)
    stem.with_suffix(".md").write_text(markdown(results, device, bandwidth, dtype, command))
    payload = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "threads": sorted({r.threads for r in results if r.threads is not None}),
        "command": command,
        "results": [asdict(r) for r in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return stem.with_suffix(".md")


__all__ = ["Case", "Result", "run_cases", "write", "markdown", "summary"]
