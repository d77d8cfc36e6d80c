"""The CPU execution lane itself (tests/simt/simt_cuda.h): a small kernel with the project's
patterns (tests/simt/selftest.cu) runs correctly, and each planted bug is reported by the check
that is meant to catch it: simt's own aborts, ASan/UBSan, TSan, or a wrong result (the poisoned
shared memory, the arrival counter)."""

import os
import subprocess

import pytest

pytestmark = pytest.mark.simt

# scenario -> {build variant: (exit code, text the output must contain)}
SIMT_ABORT = -6  # SIGABRT
SCENARIOS = {
    "ok": {"asan": (0, "launch 1: no error, sum -15 (want -15), counter 0"),
           "tsan": (0, "launch 1: no error, sum -15 (want -15), counter 0")},
    "divergent_barrier": {"asan": (SIMT_ABORT, "divergent __syncthreads()")},
    "barrier_after_exit": {"asan": (SIMT_ABORT, "thread(s) of the block exited (divergent barrier)")},
    "divergent_shuffle": {"asan": (SIMT_ABORT, "divergent warp collective")},
    "shuffle_outside_mask": {"asan": (SIMT_ABORT, "reads lane 20, which is not in mask 0x0000ffff")},
    "shared_overflow": {"asan": (1, "index 32 out of bounds for type 'float [32]'")},
    "uninitialised_shared": {"asan": (3, "sum -nan")},
    "global_overflow": {"asan": (SIMT_ABORT, "AddressSanitizer: heap-buffer-overflow")},
    "missing_barrier": {"tsan": (SIMT_ABORT, "ThreadSanitizer: data race")},
    "missing_write_fence": {"tsan": (SIMT_ABORT, "ThreadSanitizer: data race")},
    "missing_read_fence": {"tsan": (SIMT_ABORT, "ThreadSanitizer: data race")},
    "no_counter_reset": {"asan": (3, "counter 7")},
    "shared_too_large": {"asan": (SIMT_ABORT, "over the 49152 of static shared memory")},
    "invalid_launch": {"asan": (0, "invalid configuration argument")},
}


@pytest.fixture(scope="module")
def selftest():
    from simt import build

    reason = build.unavailable_reason()
    if reason:
        pytest.skip(f"simt lane: {reason}")

    def run(variant, scenario):
        result = subprocess.run([str(build.program("selftest", variant)), scenario], env=build.sanitizer_env(variant),
                                capture_output=True, text=True, timeout=300)
        return result.returncode, result.stdout + result.stderr

    return run


@pytest.mark.parametrize("scenario,variant", [(s, v) for s, runs in SCENARIOS.items() for v in runs])
def test_the_lane_reports_each_planted_bug(selftest, scenario, variant):
    code, output = selftest(variant, scenario)
    want_code, want_text = SCENARIOS[scenario][variant]
    assert code == want_code and want_text in output, \
        f"exit {code}, want {want_code} and {want_text!r}:\n{output[-6000:]}"


def aborts():  # runs in the sanitized worker, as a simt or sanitizer abort would end it
    print("the report", flush=True)
    os.abort()


def answers(x):
    return x + 1


def test_the_worker_reports_a_crash_and_starts_afresh(sanitized):
    with pytest.raises(AssertionError, match=r"simt worker died \(exit code -6\) in aborts\(\{\}\):\nthe report"):
        sanitized(aborts)
    assert sanitized(answers, x=41) == 42
