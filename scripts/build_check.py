"""Builds the extension the ways a user can, and checks that each registers its kernels.

    python scripts/build_check.py                      # every build, with the current Python's torch
    python scripts/build_check.py --ways current       # only check the build in this checkout
    python scripts/build_check.py --ways wheel,cmake   # some of them
    python scripts/build_check.py --tests -- -x        # then the test suite over the editable build

Each way works in a clean copy of this checkout (its git-tracked and new files, no build outputs)
under a temporary folder, and installs into an *overlay* environment: a venv whose site-packages
names the current one in a .pth file, so it sees torch and the rest, but not the .pth files there
(an editable install of this checkout among them). This checkout and the current environment are
left as they are.
  current    no build: the extension of this checkout (what `pip install -e .` built here)
  editable   pip install --no-build-isolation --no-deps -e <copy>            (setup.py, in place)
  wheel      pip wheel --no-build-isolation --no-deps <copy>, installed      (setup.py, in the wheel)
  first-use  a wheel built with FUSEDLOSS_NO_EXTENSION=1, installed: the first import of the
             operators compiles them with ninja (fusedloss/core/extension.py)
  cmake      cmake -S <copy> -B <build> with Torch's CMake package; FUSEDLOSS_OPS_LIBRARY loads it
Each is imported from where it was installed, and must register the CPU and Meta kernels of every
operator, and the CUDA kernels too when torch has CUDA (--cuda to say otherwise). The CUDA
architectures are what a user's build takes: TORCH_CUDA_ARCH_LIST when set, else torch's.
--tests runs pytest in the editable copy (the overlay's Python, no GPU needed) after the builds.

scripts/cuda_build_check.sh runs this in a scratch venv with the CUDA build of torch;
scripts/gpu_check.sh runs it on a GPU machine. Exit status 1 if a way failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = ("current", "editable", "wheel", "first-use", "cmake")
FAMILIES = ("pva", "blendshape", "score")
OPERATORS = [f"{family}_{phase}" for family in FAMILIES for phase in ("forward", "backward")]

# Run in the environment of each way: where fusedloss comes from, and every operator's kernels.
CHECK = """
import json, sys, torch, fusedloss
from fusedloss.core import extension
loaded = extension.load()
keys = ("CPU", "CUDA", "Meta")
kernels = {op: [k for k in keys if loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op}", k)]
           for op in json.loads(sys.argv[1])}
print(json.dumps({"file": fusedloss.__file__, "loaded": loaded, "error": extension.error(),
                  "no_cuda": extension.no_cuda_reason(), "kernels": kernels,
                  "module": getattr(sys.modules.get("fusedloss._C"), "__file__", None)}))
"""


def checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [f for f in out if f and (ROOT / f).is_file()]


def copy_checkout(dest: Path) -> Path:
    """A clean clone of this working tree at ``dest``: its files, committed to a new repository
    there (the tests that look at the checkout ask git for its files)."""
    for f in checkout_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    git = ["git", "-C", str(dest), "-c", "user.name=build_check", "-c", "user.email=build_check@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "a copy of the working tree"]):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return dest


class Failed(Exception):
    pass


def run(cmd, log, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``, its output appended to ``log``; Failed if it exits non-zero."""
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    log.write(result.stdout + result.stderr)
    log.flush()
    if result.returncode != 0:
        raise Failed(f"{Path(str(cmd[0])).name} exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return result


def overlay(folder: Path, log) -> Path:
    """A venv that sees the current environment's packages (not its .pth files); its python."""
    run([sys.executable, "-m", "venv", "--without-pip", folder], log)
    python = folder / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], log).stdout.strip())
    # The current environment's site folders: its own, and those it names in turn (when it is
    # itself such an overlay, e.g. this script run by the editable way's tests).
    base = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    (site / "base_environment.pth").write_text("\n".join(dict.fromkeys(base)) + "\n")
    return python


def user_env(python: Path | None = None, **extra) -> dict:
    """The environment of a user of ``python`` (default: the current Python): its bin folder first
    on PATH (an activated venv, so a script's ``python3`` is that Python), no PYTHONPATH and no
    FUSEDLOSS_OPS_LIBRARY of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDLOSS_OPS_LIBRARY")}
    env["PATH"] = f"{Path(python or sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def check_kernels(python: Path, env: dict, expect_cuda: bool, log) -> str:
    """Import fusedloss with ``python`` and check every operator's kernels; a one-line summary."""
    import json

    result = run([python, "-c", CHECK, json.dumps(OPERATORS)], log, env=env, cwd=tempfile.gettempdir(), timeout=3600)
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    if not facts["loaded"]:
        raise Failed(f"the extension did not load: {facts['error']}")
    expected = ["CPU", "CUDA", "Meta"] if expect_cuda else ["CPU", "Meta"]
    missing = {op: sorted(set(expected) - set(keys)) for op, keys in facts["kernels"].items() if set(expected) - set(keys)}
    if missing:
        raise Failed(f"kernels missing: {missing}" + (f" (no CUDA: {facts['no_cuda']})" if facts["no_cuda"] else ""))
    return f"{len(OPERATORS)} operators x {', '.join(expected)}; fusedloss from {facts['file']}"


def way_current(work: Path, expect_cuda: bool, log) -> str:
    python = overlay(work / "env", log)
    summary = check_kernels(python, user_env(PYTHONPATH=str(ROOT)), expect_cuda, log)
    if f"{ROOT}/fusedloss/" not in summary:
        raise Failed(f"imported the wrong copy: {summary}")
    return summary


def way_editable(work: Path, expect_cuda: bool, log) -> tuple[str, Path, Path]:
    src = copy_checkout(work / "src")
    python = overlay(work / "env", log)
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-build-isolation", "--no-deps", "-e", src],
        log, env=user_env(), timeout=7200)
    summary = check_kernels(python, user_env(), expect_cuda, log)
    if not str(next(src.glob("fusedloss/_C*.so"), "")):
        raise Failed("no fusedloss/_C*.so was built in place")
    if f"{src}/fusedloss/" not in summary:
        raise Failed(f"imported the wrong copy: {summary}")
    return summary, python, src


def build_wheel(src: Path, out: Path, log, **env) -> Path:
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", out, src], log,
        env=user_env(**env), timeout=7200)
    (wheel,) = out.glob("fusedloss-*.whl")
    return wheel


def install_wheel(wheel: Path, work: Path, log) -> tuple[Path, Path]:
    python = overlay(work / "env", log)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], log).stdout.strip())
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel], log)
    return python, site


def way_wheel(work: Path, expect_cuda: bool, log) -> str:
    src = copy_checkout(work / "src")
    wheel = build_wheel(src, work / "dist", log)
    import zipfile

    if not any(n.startswith("fusedloss/_C") for n in zipfile.ZipFile(wheel).namelist()):
        raise Failed(f"{wheel.name} holds no compiled extension")
    python, site = install_wheel(wheel, work, log)
    summary = check_kernels(python, user_env(), expect_cuda, log)
    if f"{site}/fusedloss/" not in summary:
        raise Failed(f"imported the wrong copy: {summary}")
    return summary


def way_first_use(work: Path, expect_cuda: bool, log) -> str:
    src = copy_checkout(work / "src")
    wheel = build_wheel(src, work / "dist", log, FUSEDLOSS_NO_EXTENSION="1")
    python, site = install_wheel(wheel, work, log)
    env = user_env(TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"))
    summary = check_kernels(python, env, expect_cuda, log)
    if f"{site}/fusedloss/" not in summary:
        raise Failed(f"imported the wrong copy: {summary}")
    if not any((work / "torch_extensions").glob("**/fusedloss_ops*.so")):
        raise Failed("nothing was compiled on first use")
    return summary


def way_cmake(work: Path, expect_cuda: bool, log) -> str:
    import torch

    src = copy_checkout(work / "src")
    build = work / "build"
    env = user_env()
    run(["cmake", "-S", src, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], log, env=env,
        timeout=3600)
    run(["cmake", "--build", build, "-j", str(os.environ.get("MAX_JOBS") or os.cpu_count() or 2)], log, env=env,
        timeout=7200)
    library = build / "libfusedloss_ops.so"
    python = overlay(work / "env", log)
    summary = check_kernels(python, {**env, "PYTHONPATH": str(src), "FUSEDLOSS_OPS_LIBRARY": str(library)},
                            expect_cuda, log)
    return summary + f"; operators from {library}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", default="editable,wheel,first-use,cmake",
                        help=f"comma-separated, of {', '.join(WAYS)} (default: all but current)")
    parser.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto",
                        help="expect the CUDA kernels (auto: when torch has CUDA)")
    parser.add_argument("--work", help="working folder (default: a temporary one, removed when all ways pass)")
    parser.add_argument("--parallel", action="store_true", help="run the ways at once (MAX_JOBS split between them)")
    parser.add_argument("--tests", action="store_true", help="then run pytest in the editable copy")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    if unknown := set(ways) - set(WAYS):
        parser.error(f"unknown ways: {', '.join(sorted(unknown))}")
    if args.tests and "editable" not in ways:
        parser.error("--tests runs in the editable build: include it in --ways")
    import torch

    expect_cuda = {"yes": True, "no": False, "auto": torch.version.cuda is not None}[args.cuda]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fusedloss-build-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"build_check: torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: "
          f"{torch.cuda.is_available()}), {os.environ.get('TORCH_CUDA_ARCH_LIST') and 'TORCH_CUDA_ARCH_LIST=' + os.environ['TORCH_CUDA_ARCH_LIST'] or 'TORCH_CUDA_ARCH_LIST unset'}; "
          f"work in {work}", flush=True)
    jobs = str(max(1, (os.cpu_count() or 2) // (len(ways) if args.parallel else 1)))
    os.environ.setdefault("MAX_JOBS", jobs)  # (ninja's parallelism in setup.py, the first use and CMake)

    def one(way: str) -> tuple[str, str, object]:
        start = time.monotonic()
        folder = work / way
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result = None
        with open(work / f"{way}.log", "w") as log:
            try:
                if way == "editable":
                    summary, *result = way_editable(folder, expect_cuda, log)
                else:
                    summary = {"current": way_current, "wheel": way_wheel, "first-use": way_first_use,
                               "cmake": way_cmake}[way](folder, expect_cuda, log)
                status = f"ok: {summary}"
            except (Failed, subprocess.TimeoutExpired) as e:
                status = f"FAILED: {e}"
        print(f"build_check {way}: {status} ({time.monotonic() - start:.0f} s; log {work / f'{way}.log'})", flush=True)
        return way, status, result

    with ThreadPoolExecutor(max_workers=len(ways) if args.parallel else 1) as pool:
        outcomes = list(pool.map(one, ways))
    failed = [way for way, status, _ in outcomes if not status.startswith("ok")]
    editable = next((result for way, status, result in outcomes if way == "editable" and result), None)
    code = 1 if failed else 0
    if args.tests and editable is not None and "editable" not in failed:
        python, src = editable
        print(f"build_check tests: {python} -m pytest {' '.join(args.pytest_args)} (in {src})", flush=True)
        tests = subprocess.run([str(python), "-m", "pytest", *args.pytest_args], cwd=src,
                               env=user_env(python)).returncode
        print(f"build_check tests: {'ok' if tests == 0 else f'FAILED (pytest exit {tests})'}", flush=True)
        code = code or tests
    if not failed and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"build_check: {'FAILED: ' + ', '.join(failed) if failed else 'every build ok'}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
