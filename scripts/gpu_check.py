"""Everything we want from a lent GPU, in one run of at most 8 minutes (scripts/gpu_check.sh).

    bash scripts/gpu_check.sh              # on a GPU machine: results in bench/results/
    bash scripts/gpu_check.sh --dry-run    # anywhere: the same steps, skipping what needs a GPU

Steps, each with its own time limit inside one budget:
  environment  the GPU, driver, torch, nvcc and compute-sanitizer versions
  build        pip install --no-build-isolation --no-deps -e . (CUDA kernels for this GPU only;
               the dry run adds pip's --dry-run)
  backends     which backends run here (on a GPU: cuda and triton must)
  build checks scripts/build_check.py, in parallel with the tests: the build above must register the
               CPU, CUDA and Meta kernels of every operator, and so must the other ways a user
               builds the extension (a wheel, the wheel's build on first use, CMake), each from a
               clean copy, for this GPU's architecture; the dry run checks the build above alone
  tests        the whole test suite but the CPU-only SIMT lane (CI runs that), with pytest-xdist
               when installed; the dry run only collects it (it is the suite that runs this)
  sanitizers   compute-sanitizer memcheck, racecheck, synccheck and initcheck over
               scripts/gpu_kernels.py (every CUDA and Triton kernel of the three families), in
               parallel with the tests; errors in fusedloss's kernels fail the step, errors only in
               other kernels (PyTorch's) are reported as warnings. The dry run runs the script on the CPU
  bench        bench/run.py, alone on the GPU: first the seed-shapes table (fused vs one F.mse_loss,
               kernel launches per step: <out>/<gpu>-seed-shapes.md and .json), then a reduced case
               list: <out>/<gpu>.md and .json (written after every case, so a run out of time keeps
               what it measured); the dry run skips the seed shapes (tests/test_bench.py runs them)
  model calibration  python -m fusedloss.benchmark.calibrate: the cases of the H200 model
               (bench/results/model-h200.json) timed on this GPU, launches counted, and with ncu the
               DRAM bytes and sectors per request of each kernel: <out>/model-calibration-<gpu>.md
               and .json, measured next to predicted; the dry run times two small cases on the CPU
  bench distributed  bench/distributed.py: the losses over a process group next to the local loss,
               over NCCL with one rank (one GPU): <out>/distributed-<gpu>-W1.md and .json
Everything goes to <out>/<gpu>-gpu-check.log, the summary table last. Exit status 1 if a step failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
# The kernels of fusedloss (CUDA and Triton share the names), and CUB's sort they call.
OUR_KERNELS = re.compile(r"(pva|blendshape|score)_(forward|backward|keys)_kernel|DeviceRadixSort")
# Seed systems' training shapes (host-bound) and one large size per family (bandwidth-bound).
BENCH_BATCHES = "pva:8,pva:512,blendshape:16,blendshape:65536,score:256,score:65536"
DRY_RUN_BENCH_BATCHES = "pva:8,blendshape:16,score:256"


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float
    env: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""
    process: subprocess.Popen | None = None
    started: float = 0.0

    def start(self, log_dir: Path) -> None:
        self.started = time.monotonic()
        self.log_path = log_dir / f"{self.name.replace(' ', '-')}.out"
        self.log_file = open(self.log_path, "w")
        try:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env={**os.environ, **self.env},
                                            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.process = None
            self.log_file.write(f"could not start {self.command[0]}: {e}\n")

    def wait(self) -> int | None:
        """The exit status, or None when it ran out of time (then it is killed)."""
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:  # its children too (pytest-xdist workers, the sanitized program)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.seconds = time.monotonic() - self.started
        self.log_file.close()
        self.output = self.log_path.read_text(errors="replace")
        return code if self.process is not None else -1


def run_all(steps: list[Step], log_dir: Path) -> list[int | None]:
    """Start the steps together, wait for each."""
    for s in steps:
        s.start(log_dir)
    return [s.wait() for s in steps]


def plain_status(step: Step, code: int | None) -> None:
    step.status = "ok" if code == 0 else ("TIMEOUT" if code is None else f"FAILED (exit {code})")


def sanitizer_status(step: Step, code: int | None) -> None:
    """ok, a warning (errors only outside fusedloss's kernels), unavailable, or FAILED."""
    out = step.output
    if re.search(r"Device not supported|not supported on this platform|Unable to find injection library", out):
        step.status = "unavailable here (see the log)"
        return
    if code is None:
        step.status = "TIMEOUT"
        return
    summary = re.search(r"ERROR SUMMARY: (\d+) error", out)
    total = int(summary.group(1)) if summary else None
    ours = sum(1 for line in out.splitlines() if re.match(r"=+\s+at ", line) and OUR_KERNELS.search(line))
    if total == 0 and code == 0:
        step.status = "ok, 0 errors"
    elif ours:
        step.status = f"FAILED: {ours} error(s) in fusedloss kernels, {total} in all"
    elif total and code == 99:
        step.status = f"warning: {total} error(s), none in fusedloss kernels"
    else:
        step.status = f"FAILED (exit {code}{'' if total is None else f', {total} errors'})"


def gpu_facts() -> tuple[bool, str, str]:
    """(a CUDA GPU is here, its compute capability as TORCH_CUDA_ARCH_LIST wants it, results file stem)."""
    import torch

    from fusedloss.benchmark import file_stem

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return True, f"{major}.{minor}", file_stem(torch.device("cuda"))
    return False, "", file_stem(torch.device("cpu"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: run every step that does not need one")
    parser.add_argument("--out", help="results folder (default bench/results; a temporary one for --dry-run)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    sys.path.insert(0, str(ROOT))
    has_gpu, arch, stem = gpu_facts()
    if not has_gpu and not args.dry_run:
        print("gpu_check: no CUDA GPU here; use --dry-run to check the steps without one", file=sys.stderr)
        return 2
    dry = args.dry_run
    if args.out:
        out = Path(args.out)
    else:
        out = Path(tempfile.mkdtemp(prefix="gpu-check-")) if dry else ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-steps-"))
    toolkit_sanitizer = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer"
    sanitizer = shutil.which("compute-sanitizer") or (str(toolkit_sanitizer) if toolkit_sanitizer.is_file() else None)
    left = lambda: args.budget - (time.monotonic() - start)  # noqa: E731

    env_step = Step("environment", ["bash", "-c", "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,"
                                    "memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -2; "
                                    f"{sanitizer or 'compute-sanitizer'} --version | head -3; "
                                    f"{PY} -c 'import torch, triton; print(torch.__version__, torch.version.cuda, "
                                    "triton.__version__)'; true"], 30)
    # The dry run asks pip what it would do (setup.py's metadata, no compile): rebuilding in place
    # would overwrite the extension under the running test suite that runs the dry run.
    build = Step("build", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".",
                           *(["--dry-run"] if dry else [])], 180,
                 env={"MAX_JOBS": str(os.cpu_count() or 4), **({"TORCH_CUDA_ARCH_LIST": arch} if arch else {})})
    check_backends = ("import fusedloss.backends as b, sys; print(b.describe()); "
                      "sys.exit(any(b.unavailable_reason(n, 'cuda') for n in ('cuda', 'triton')))")
    backends_step = Step("backends", [PY, "-c", check_backends if has_gpu else
                                      "import fusedloss.backends as b; print(b.describe())"], 60)
    xdist = [] if dry else (["-n", "6"] if subprocess.run([PY, "-c", "import xdist"], capture_output=True).returncode
                            == 0 else [])
    tests = Step("tests", [PY, "-m", "pytest", "tests", "-m", "not simt", "-q", "-rfE", "-p", "no:cacheprovider",
                           *xdist, *(["--collect-only"] if dry else [])], 210, env={"FUSEDLOSS_GPU_CHECK": "1"})
    build_checks = Step("build checks", [PY, "scripts/build_check.py", "--ways",
                                         "current" if dry else "current,cmake,wheel,first-use", "--parallel"], 210,
                        env={"MAX_JOBS": str(max(1, (os.cpu_count() or 4) // 4)),
                             **({"TORCH_CUDA_ARCH_LIST": arch} if arch else {})})
    kernels = [PY, "scripts/gpu_kernels.py"] + (["--device", "cpu", "--dtypes", "float32"] if dry else [])
    sanitizers = []
    if dry or sanitizer is None:
        sanitizers.append(Step("gpu_kernels.py", kernels, 210, env={"TRITON_INTERPRET": "1"} if dry else {}))
    if not dry and sanitizer is not None:
        # Without the caching allocator every tensor is its own allocation: exact bounds for memcheck,
        # fresh (uninitialised) memory for initcheck.
        sanitizers += [Step(f"sanitizer {tool}", [sanitizer, "--tool", tool, "--error-exitcode", "99",
                                                  "--print-limit", "30", *kernels], 210,
                            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}) for tool in SANITIZER_TOOLS]
    # (the dry run: the seed-sized batches only; the large ones take a minute on a CPU and check nothing more)
    bench = Step("bench", [PY, "bench/run.py", "--device", "cuda" if has_gpu else "cpu", "--batches",
                           DRY_RUN_BENCH_BATCHES if dry else BENCH_BATCHES,
                           "--out", str(out), *(["--modes", "eager", "--phases", "full", "--section", "cases"] if dry else [])],
                 150)

    # The H200 model's cases timed here, next to bench/results/model-h200.json's predictions (with ncu's
    # DRAM bytes and sectors per request when Nsight Compute is there). The dry run: two small cases, CPU.
    calibration = Step("model calibration", [PY, "-m", "fusedloss.benchmark.calibrate", "--out", str(out),
                                             *(["--ncu"] if has_gpu and shutil.which("ncu") else []),
                                             *(["--device", "cpu", "--case", "blendshape [16, 52]", "--case",
                                                "score B=64"] if dry else [])], 150)

    bench_group = Step("bench distributed", [PY, "bench/distributed.py", "--device", "cuda" if has_gpu else "cpu",
                                             "--world", "1" if has_gpu else "2", "--out", str(out),
                                             *(["--rounds", "1", "--iterations", "2"] if dry else [])], 60)

    stages = [[env_step], [build], [backends_step], [tests, build_checks, *sanitizers], [bench], [calibration], [bench_group]]
    for stage in stages:
        for s in stage:
            s.timeout = min(s.timeout, left() - 5)
        if any(s.timeout < 10 for s in stage):
            for s in stage:
                s.status = "skipped: out of time"
            continue
        codes = run_all(stage, work)
        for s, code in zip(stage, codes):
            (sanitizer_status if s.name.startswith("sanitizer") else plain_status)(s, code)
            if s is bench and code is None:  # the bench writes its files after every case
                s.status = "warning: out of time; the cases measured so far are written"
    if not dry and sanitizer is None:
        sanitizers[0].status += "; compute-sanitizer not found"

    steps = [s for stage in stages for s in stage]
    table = ["| step | status | seconds |", "|---|---|---:|"]
    table += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    if dry:
        table += [f"| sanitizer {tool} | skipped: needs a GPU | 0 |" for tool in SANITIZER_TOOLS]
    failed = [s for s in steps if not (s.status.startswith(("ok", "warning", "unavailable")))]
    outcome = ("FAILED: " + ", ".join(s.name for s in failed)) if failed else "ok"
    verdict = f"gpu_check{' --dry-run' if dry else ''}: {outcome}"
    log = out / f"{stem}-gpu-check.log"
    with open(log, "w") as f:
        for s in steps:
            f.write(f"==================== {s.name}: {s.status} ({s.seconds:.0f} s)\n$ {' '.join(s.command)}\n")
            f.write(s.output + "\n")
        f.write("\n".join(table) + f"\n\n{verdict} in {time.monotonic() - start:.0f} s\n")
    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table))
    print(f"\n{verdict} in {time.monotonic() - start:.0f} s; log: {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
