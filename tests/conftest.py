"""Shared test setup: which (backend, device) pairs run here, and per-dtype tolerances.

Without a GPU, Triton kernels run through the Triton interpreter, which must be switched on
before triton is imported: that happens here, first.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh compile cache per session: inductor's on-disk cache keys a compiled backward by the
# forward graph, so a changed autograd formula of an operator could otherwise replay a stale one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fusedloss-inductor-"))

import pytest  # noqa: E402

from fusedloss import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def fused_cases():
    """Every fused (backend, device) pair, available or skipped with the reason."""
    cases = [("cpu", "cpu")]
    if HAS_CUDA:
        cases += [("cuda", "cuda"), ("triton", "cuda")]
    else:
        cases += [("triton", "cpu"), ("cuda", "cuda")]
    params = []
    for backend, device in cases:
        if device == "cuda" and not HAS_CUDA:
            reason = "no CUDA GPU on this machine"
        else:
            reason = backends.unavailable_reason(backend, device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


FUSED = fused_cases()


@pytest.fixture(params=FUSED)
def fused(request):
    """(backend, device) of a fused backend that runs here."""
    return request.param


def interpreted(backend: str, device: str) -> bool:
    """Triton through the interpreter: slow, so tests keep its shapes small."""
    return backend == "triton" and device == "cpu"


# (rtol, atol relative to the largest expected magnitude) for comparing with the reference.
# Values are float32 (float64) in both; 16-bit gradients differ by the output rounding.
VALUE_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-5, 1e-6),
    torch.bfloat16: (2e-5, 1e-6),
}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}


def assert_close(actual, expected, dtype, *, grad=False, msg=""):
    rtol, atol = (GRAD_TOL if grad else VALUE_TOL)[dtype]
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=rtol, atol=atol * max(scale, 1e-30), msg=lambda m: f"{msg}: {m}"
    )


@pytest.fixture(scope="session")
def sanitized():
    """``sanitized(check, **kwargs)`` runs ``check(**kwargs)`` (a function of the calling test
    module) in a worker process under AddressSanitizer + UndefinedBehaviorSanitizer, where the
    CUDA kernels run on CPU threads (tests/simt). Returns what ``check`` returns."""
    from simt import build, worker

    reason = build.unavailable_reason()
    if reason:
        pytest.skip(f"simt lane: {reason}")
    runner = worker.Worker(build.kernels_module("asan"), build.sanitizer_env("asan"))
    yield runner.call
    runner.close()
