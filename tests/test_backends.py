"""Backend choice, unavailable backends, and the build-on-first-use fallback."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA

from fusedloss import backends

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, env: dict | None = None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


def test_auto_prefers_the_fused_backend():
    expected = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "reference"
    assert backends.resolve("auto", "cpu") == expected
    assert backends.resolve("auto", "mps") == "reference"
    assert "reference" in backends.available("cpu")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("fastest", "cpu")


def test_wrong_device_says_which_backend_fits():
    with pytest.raises(backends.BackendUnavailableError, match="runs on CUDA tensors.*use 'cpu'"):
        backends.resolve("cuda", "cpu")
    with pytest.raises(backends.BackendUnavailableError, match="runs on CPU tensors"):
        backends.resolve("cpu", "cuda")


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here")
def test_cuda_backend_without_cuda_kernels_says_how_to_get_them():
    with pytest.raises(backends.BackendUnavailableError, match="without CUDA kernels.*pip install"):
        backends.resolve("cuda", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="the message is for machines without a GPU")
def test_triton_on_cpu_without_the_interpreter_says_how_to_get_it():
    result = run_python(
        """
        import torch, fusedloss
        x = torch.randn(2, 4, 265)
        try:
            fusedloss.functional.pva_loss(x, x, backend="triton")
        except fusedloss.BackendUnavailableError as e:
            print("ERROR:", e)
        """,
        env={"TRITON_INTERPRET": None},
    )
    assert "ERROR:" in result.stdout, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "CUDA GPU" in result.stdout


def test_describe_reports_every_device_backend():
    text = backends.describe()
    assert "torch" in text and "cpu" in text and "reference" in text


def test_compile_as_the_first_call_resolves_the_backend_while_tracing():
    """The first use may be inside torch.compile: resolution (loading the extension) runs at trace time."""
    result = run_python(
        """
        import torch, fusedloss
        loss_fn = fusedloss.PVALoss(use_last_frame_loss=True)
        pred = torch.randn(2, 6, 265, requires_grad=True)
        target, cond = torch.randn(2, 6, 265), torch.randn(2, 265)
        f = torch.compile(lambda p: loss_fn(p, target, cond)[0], fullgraph=True)
        total = f(pred)
        total.backward()
        ref = fusedloss.functional.pva_loss(pred, target, cond, use_last_frame_loss=True, backend="reference")[0]
        print("OK", float(total), float(ref), bool(pred.grad.abs().sum() > 0))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, total, ref, has_grad = result.stdout.split()
    assert abs(float(total) - float(ref)) < 1e-5 * abs(float(ref)) and has_grad == "True"


@pytest.mark.slow
def test_package_without_built_extension_builds_it_on_first_use(tmp_path):
    """A copy of the package with no compiled fusedloss._C compiles the sources with ninja, once."""
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        pytest.skip("ninja is not installed")
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "fusedloss", copy / "fusedloss", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    result = run_python(
        """
        import sys
        # An editable install of this checkout would map fusedloss._C back to it: ignore it.
        sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        import torch, fusedloss
        from fusedloss import functional as F
        x, y = torch.randn(2, 5, 265), torch.randn(2, 5, 265)
        a = F.pva_loss(x, y, backend="cpu")[0]
        b = F.pva_loss(x, y, backend="cpu")[0]
        r = F.pva_loss(x, y, backend="reference")[0]
        print("OK", float(a), float(b), float(r), fusedloss.__file__)
        """,
        # The CPU kernels alone, also with a CUDA build of torch (its CUDA kernels would take many
        # minutes; scripts/build_check.py's first-use way builds them).
        env={"PYTHONPATH": str(copy), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "FUSEDLOSS_NO_CUDA": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, a, b, r, where = result.stdout.split()
    assert where.startswith(str(copy))
    assert a == b and abs(float(a) - float(r)) < 1e-5 * abs(float(r))
    assert result.stderr.count("compiling it now with ninja") == 1


def test_import_is_light():
    """`import fusedloss` imports neither Triton nor torch._dynamo: TRITON_INTERPRET can still be set
    after it, and importing costs no compiler start-up."""
    result = run_python(
        """
        import sys, fusedloss
        print(sorted(m for m in ("triton", "torch._dynamo", "torch._inductor") if m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_resolve_is_marked_as_torch_marks_constant_results():
    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert marked.__dict__ == backends.resolve.__dict__ == {"_dynamo_marked_constant": True}
