"""The wheel and the sdist carry every source the build on first use needs.

From a clean copy of the checkout (its git-tracked and new files, no build outputs) the test
builds an sdist and a wheel with setuptools' PEP 517 hooks and without the prebuilt extension
(``FUSEDLOSS_NO_EXTENSION=1``), checks that both hold every file of ``csrc/``, then installs the
wheel into a fresh virtual environment and runs the C++ CPU kernels from it: the package compiles
them on first use (with ninja, from ``fusedloss/csrc``) and they must match the reference.

The fresh environment sees this machine's torch through a ``.pth`` line naming the current
site-packages folder; ``.pth`` files of that folder (the editable install of this checkout among
them) are not run for it, so ``import fusedloss`` can only find the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def checkout_files() -> list[str]:
    """The files of a clean clone of this working tree (tracked, or new and not ignored)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def csrc_files() -> set[str]:
    return {f[len("csrc/"):] for f in checkout_files() if f.startswith("csrc/")}


def run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built from a clean copy of the checkout, without the compiled extension."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for f in checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = tmp / "dist"
    out.mkdir()
    env = {**os.environ, "FUSEDLOSS_NO_EXTENSION": "1"}
    # (setuptools' hooks rewrite sys.argv: the output folder is read first)
    hooks = ("import sys; out = sys.argv[1]; from setuptools import build_meta as b; "
             "print(b.build_sdist(out)); print(b.build_wheel(out))")
    run([sys.executable, "-c", hooks, str(out)], cwd=src, env=env)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def test_sdist_and_wheel_carry_every_csrc_file(dists):
    sdist, wheel = dists
    expected = csrc_files()
    assert {"module.cpp", "common/cuda_helpers.cuh", "pva/pva_cuda.cu", "score/score_math.h"} <= expected
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    in_sdist = {n[len(f"{top}/csrc/"):] for n in names if n.startswith(f"{top}/csrc/")}
    assert expected <= in_sdist, f"missing from the sdist: {sorted(expected - in_sdist)}"
    assert f"{top}/fusedloss/core/build.py" in names  # setup.py reads the sources and flags from it
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {n[len("fusedloss/csrc/"):] for n in whl.namelist() if n.startswith("fusedloss/csrc/")}
        assert not any(n.startswith("fusedloss/_C") for n in whl.namelist()), "the wheel holds a prebuilt extension"
    assert expected <= in_wheel, f"missing from the wheel: {sorted(expected - in_wheel)}"


def test_wheel_carries_every_python_module(dists):
    """Every .py file of the package in the checkout is in the wheel (a subpackage missing from
    setup.py's list would be left out)."""
    _, wheel = dists
    expected = {f for f in checkout_files() if f.startswith("fusedloss/") and f.endswith(".py")}
    assert "fusedloss/integrations/tigas.py" in expected
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("fusedloss/") and n.endswith(".py")}
    assert expected <= in_wheel, f"missing from the wheel: {sorted(expected - in_wheel)}"


def test_wheel_compiles_and_runs_the_cpu_kernels_on_first_use(dists, tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    _, wheel = dists
    env_dir = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The current environment's site folders: its own, and those it names in turn (a venv over
    # another environment, as scripts/build_check.py makes, finds torch in the outer one).
    outer = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    (site / "outer_site.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
         str(wheel)])
    script = """
import sys, torch, fusedloss
from fusedloss import functional as F
assert fusedloss.__file__.startswith(sys.argv[1]), fusedloss.__file__
pred, target = torch.randn(2, 7, 40, dtype=torch.float64, requires_grad=True), torch.randn(2, 7, 40, dtype=torch.float64)
parts = {"a": (0, 13, 1.0), "b": (10, 40, 0.5)}
fused, _ = F.pva_loss(pred, target, part_w_dict=parts, backend="cpu")
ref, _ = F.pva_loss(pred, target, part_w_dict=parts, backend="reference")
(g_fused,) = torch.autograd.grad(fused, pred)
(g_ref,) = torch.autograd.grad(ref, pred)
torch.testing.assert_close(fused, ref)
torch.testing.assert_close(g_fused, g_ref)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSEDLOSS_OPS_LIBRARY")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    # The CPU kernels alone, also with a CUDA build of torch (its CUDA kernels would take many
    # minutes; scripts/build_check.py's first-use way builds them from a wheel).
    env["FUSEDLOSS_NO_CUDA"] = "1"
    result = run([python, "-c", script, str(site)], cwd=tmp_path, env=env)
    assert "ok" in result.stdout
    assert "compiling it now" in result.stderr  # the build on first use ran, from the wheel's sources
