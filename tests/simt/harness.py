"""What the family checks share, inside the sanitized worker: the kernels module, tensors passed
as addresses, poisoned outputs, and the forward launched as the torch dispatch launches it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

DTYPE_NAMES = {torch.float32: "kFloat32", torch.float64: "kFloat64", torch.float16: "kFloat16",
               torch.bfloat16: "kBFloat16"}


@functools.cache
def kernels():
    """The ``simt_kernels`` module the worker was started for (ASan + UBSan build)."""
    path = os.environ["FUSEDLOSS_SIMT_MODULE"]
    spec = importlib.util.spec_from_file_location("simt_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def dtype_of(t: torch.Tensor):
    """The kernels' DType of a tensor."""
    return getattr(kernels().DType, DTYPE_NAMES[t.dtype])


def make(struct_type, **fields):
    """A bound C++ struct with the given fields set (the rest zero, as ``CudaInputs in{}``); an
    unknown field name raises AttributeError."""
    s = struct_type()
    for name, value in fields.items():
        setattr(s, name, value)
    return s


def poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output buffer filled with 0xFF bytes (NaN floats, -1 integers): an element the kernel
    forgets to write shows."""
    t = torch.empty(shape, dtype=dtype)
    poison(t)
    return t


def poison(t: torch.Tensor) -> None:
    """Fill a contiguous tensor with 0xFF bytes."""
    t.reshape(-1).view(torch.uint8).fill_(0xFF)


def workspace(nbytes: int) -> torch.Tensor:
    """Scratch memory of exactly the size asked for (ASan sees an overrun), poisoned like
    ``at::empty``'s garbage, which the kernels must write before they read."""
    return poisoned((nbytes,), torch.uint8)


@functools.cache
def arrival_counter() -> torch.Tensor:
    """One int32 counter for every forward of the process, zeroed once, as csrc/common/arrival_counter.h
    keeps one per stream: each kernel's last block must reset it."""
    return torch.zeros(1, dtype=torch.int32)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes: equal bits compare equal (NaN included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def use_device(sms: int):
    """Makes the following calls run on an emulated device of ``sms`` SMs (as the dispatch's device
    guard does; the kernels size their grids by it). Returns the kernels module."""
    k = kernels()
    k.set_sm_count(sms)
    return k


def forward_twice(launch, outputs: list[torch.Tensor]) -> list[dict]:
    """Runs ``launch()`` (a forward) in two block orders: each launch succeeds and leaves the
    arrival counter at 0, and the second writes the first's outputs bit for bit (the last-block
    reductions do not depend on which block finishes last). Returns the launches' configurations."""
    k = kernels()
    first = None
    for seed in (1, 2):
        for t in outputs:
            poison(t)
        k.set_seed(seed)
        k.clear_launches()
        error = launch()
        assert error == 0, f"forward launch failed: cudaError {error}"
        assert arrival_counter().item() == 0, f"the arrival counter is {arrival_counter().item()} after the forward"
        got = [bits(t) for t in outputs]
        if first is None:
            first = got
        else:
            for i, (a, b) in enumerate(zip(first, got)):
                assert torch.equal(a, b), f"forward output {i} differs between two block orders"
    return [{"grid": grid, "block": block} for grid, block in k.launches()]


def assert_rounded_like(got: torch.Tensor, want: torch.Tensor, what: str, most: float = 0.01) -> None:
    """A 16-bit output rounded to nearest even from float32, as PyTorch's casts round, equals the
    reference's (cast by PyTorch) but where the two float32 values straddle a rounding boundary:
    at most a fraction ``most`` of the elements. (The tolerances of assert_close allow an ulp, so a
    kernel that truncated would pass them.)"""
    if got.dtype not in (torch.float16, torch.bfloat16) or got.numel() == 0:
        return
    differ = float((got != want).float().mean())
    assert differ <= most, f"{what}: {100 * differ:.1f}% of the {got.dtype} values differ from the reference's rounding"
