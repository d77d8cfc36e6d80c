"""Which backends exist, which are available here, and which one ``"auto"`` picks.

Backends:
  "reference"  pure PyTorch (each family's ``reference.py``), any device
  "cpu"        C++ CPU kernels of the compiled extension, CPU tensors
  "cuda"       CUDA kernels of the compiled extension, CUDA tensors
  "triton"     Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)
  "auto"       the fastest available for the tensors' device (``AUTO_ORDER``)
"""

from __future__ import annotations

import os
import sys

import torch

from .core import extension

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# Preference of "auto" per device type; the first available one is used.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and how to get it."""


def triton_interpreter() -> bool:
    """Whether Triton kernels run through the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc}); `pip install triton` (Linux)"
    interpreting = triton_interpreter()
    if device_type == "cuda":
        if interpreting:
            return "TRITON_INTERPRET=1 is set, so Triton runs its interpreter on CPU tensors only; unset it for CUDA tensors"
        return None
    if device_type == "cpu":
        if interpreting:
            return None
        return (
            "Triton kernels need a CUDA GPU; on CPU tensors they run only in the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported (slow, for testing)"
        )
    return f"Triton kernels do not run on {device_type} tensors"


def _extension_reason() -> str | None:
    if extension.load():
        return None
    return (
        f"the fusedloss C++ extension could not be built or loaded ({extension.error()}); "
        "install with `pip install --no-build-isolation -e .` from a source checkout "
        "(needs a C++ compiler, and nvcc for the CUDA kernels)"
    )


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type``, else why not and how to fix it."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got {device_type} tensors (use 'cuda' or 'triton')"
        return _extension_reason()
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device_type} tensors (use 'cpu')"
        reason = _extension_reason()
        if reason:
            return reason
        if not extension.has_kernel("pva_forward", "CUDA"):
            why = extension.no_cuda_reason() or f"torch {torch.__version__}, CUDA {torch.version.cuda}"
            return (
                f"the fusedloss extension was built without CUDA kernels ({why}); rebuild it where torch has "
                "CUDA and a CUDA toolkit is found (nvcc on PATH, or CUDA_HOME): "
                "`pip install --no-build-isolation --no-deps -e .`"
            )
        return None
    raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")


def _prepare(backend: str) -> None:
    """Import what a backend's operators need before they are called (and traced)."""
    if backend == "triton":
        from .core.registry import import_triton_ops

        import_triton_ops()


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend to use for ``backend`` on tensors of ``device_type``.

    Under ``torch.compile`` this runs once at trace time (it may build the C++ extension or import
    Triton) and its answer is a constant of the graph (see ``_mark_constant_result``).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}; got {backend!r}")
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            if unavailable_reason(candidate, device_type) is None:
                _prepare(candidate)
                return candidate
        return "reference"
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"fusedloss backend {backend!r} is not available: {reason}")
    _prepare(backend)
    return backend


def _mark_constant_result(fn):
    """What ``@torch.compiler.assume_constant_result`` does, without importing torch._dynamo (a
    second of import time, which also imports Triton before a user can set TRITON_INTERPRET).
    tests/test_backends.py checks that torch still marks functions this way."""
    fn._dynamo_marked_constant = True
    return fn


resolve = _mark_constant_result(resolve)


def available(device_type: str) -> list[str]:
    """The concrete backends that can run on tensors of ``device_type`` here."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device_type) is None]


def describe() -> str:
    """A short human-readable report of the backends, for the demo and bug reports."""
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in BACKENDS[1:]:
            reason = unavailable_reason(backend, device)
            if reason is None or (device == "cpu" and backend == "cuda") or (device == "cuda" and backend == "cpu"):
                if reason is None:
                    lines.append(f"  {device:4s} {backend:9s} available")
                continue
            lines.append(f"  {device:4s} {backend:9s} unavailable: {reason}")
    return "\n".join(lines)
