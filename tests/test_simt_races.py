"""The CUDA kernels of every family under ThreadSanitizer (tests/simt/race_check.cpp): no data race,
no divergent barrier or warp collective, forward outputs bitwise equal across block orders and
the arrival counter back to 0 after every forward. The three families run at once (2 cores)."""

import subprocess

import pytest

pytestmark = pytest.mark.simt

FAMILIES = ("pva", "blendshape", "score")


@pytest.fixture(scope="module")
def race_runs():
    from simt import build

    reason = build.unavailable_reason()
    if reason:
        pytest.skip(f"simt lane: {reason}")
    program = build.program("race_check", "tsan")
    env = build.sanitizer_env("tsan")
    runs = {f: subprocess.Popen([str(program), f], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for f in FAMILIES}
    yield runs
    for run in runs.values():
        run.kill()


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_kernels_have_no_data_race(race_runs, family):
    output, _ = race_runs[family].communicate(timeout=900)
    code = race_runs[family].returncode
    assert code == 0, f"race_check {family} (exit {code}):\n{output[-12000:]}"
    assert output.rstrip().endswith("ok"), output
