"""scripts/gpu_check.sh: its dry run passes without a GPU, and it reads compute-sanitizer's verdicts right."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedloss.benchmark import file_stem, thread_counts

ROOT = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs scripts/gpu_check.sh for real")
@pytest.mark.skipif(os.environ.get("FUSEDLOSS_GPU_CHECK") == "1", reason="inside scripts/gpu_check.sh")
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| step")}
    for step in ("environment", "build", "backends", "build checks", "tests", "gpu_kernels.py", "bench",
                 "model calibration", "bench distributed"):
        assert rows.get(step) == "ok", f"{step}: {rows.get(step)}\n{result.stdout}"
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert rows[f"sanitizer {tool}"] == "skipped: needs a GPU"
    stem = next(tmp_path.glob("*-gpu-check.log")).name.removesuffix("-gpu-check.log")
    # the benchmark's table, named as the benchmark names it (on the CPU: 1 thread and all of them)
    bench_stem = file_stem(torch.device("cpu"), thread_counts(torch.device("cpu")))
    assert (tmp_path / f"{bench_stem}.md").is_file() and (tmp_path / f"{bench_stem}.json").is_file()
    assert next(tmp_path.glob("distributed-*-W2.md"), None) is not None
    assert "| blendshape [16, 52] | reference eager |" in next(tmp_path.glob("model-calibration-*.md")).read_text()
    log = (tmp_path / f"{stem}-gpu-check.log").read_text()
    assert "Would install fusedloss" in log and "all kernels ran" in log and "tests collected" in log
    assert "build_check current: ok: 6 operators x CPU" in log


@pytest.mark.parametrize("output,code,status", [
    ("========= ERROR SUMMARY: 0 errors\n", 0, "ok, 0 errors"),
    ("========= Invalid __global__ read of size 4 bytes\n"
     "=========     at void fusedloss::pva::(anonymous namespace)::pva_forward_kernel<float>(...)+0x1b0\n"
     "========= ERROR SUMMARY: 1 error\n", 99, "FAILED: 1 error(s) in fusedloss kernels, 1 in all"),
    ("========= Race reported between Write access at score_forward_kernel+0x90\n"  # a Triton kernel's name
     "=========     at score_forward_kernel+0x90 in score.py:120\n"
     "========= ERROR SUMMARY: 2 errors\n", 99, "FAILED: 1 error(s) in fusedloss kernels, 2 in all"),
    ("========= Uninitialized __global__ memory read of size 4 bytes\n"
     "=========     at void at::native::vectorized_elementwise_kernel<4, ...>(...)+0x2a0\n"
     "========= ERROR SUMMARY: 1 error\n", 99, "warning: 1 error(s), none in fusedloss kernels"),
    ("========= Error: Device not supported\n", 1, "unavailable here (see the log)"),
    ("Traceback (most recent call last):\nRuntimeError: boom\n========= ERROR SUMMARY: 0 errors\n", 1,
     "FAILED (exit 1, 0 errors)"),
], ids=["clean", "cuda kernel", "triton kernel", "torch kernel only", "unavailable", "script failed"])
def test_sanitizer_verdicts(output, code, status):
    gpu_check = load_gpu_check()
    step = gpu_check.Step("sanitizer memcheck", [], 1)
    step.output = output
    gpu_check.sanitizer_status(step, code)
    assert step.status == status


def test_bench_batches_per_family():
    from fusedloss.__main__ import _batches_by_family

    families = ["pva", "blendshape", "score"]
    assert _batches_by_family(None, families) == {f: None for f in families}
    assert _batches_by_family("64,4096", families) == {f: (64, 4096) for f in families}
    assert _batches_by_family("pva:8,score:256,score:65536", families) == {"pva": (8,), "blendshape": (),
                                                                          "score": (256, 65536)}
    with pytest.raises(SystemExit, match="unknown family 'pvaa'"):
        _batches_by_family("pvaa:8", families)
