"""What the Triton kernels of every family share: how a launcher becomes a torch operator, the
persistent grid budget, the arrival counter, and the reduction helpers of the kernels whose last
program reduces the partial results of all programs.

On a GPU each family's launchers are ``torch.library.triton_op``s calling ``wrap_triton``'d
kernels, so ``torch.compile`` sees the kernels and traces the loss with no graph break. Under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) kernels cannot be traced, so the same
launchers become opaque ``custom_op``s with an explicit fake implementation instead.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake  # (loaded by torch itself)

from ..backends import triton_interpreter


def triton_operator(name: str, fake):
    """Decorator turning a launcher into the operator ``name`` (see the module docstring)."""

    def decorate(launcher):
        if triton_interpreter():
            op = torch.library.custom_op(name, launcher, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, launcher, mutates_args=())

    return decorate


_SM_COUNT: dict = {}


def program_budget(device: torch.device, per_sm: int = 4) -> int:
    """How many programs a persistent kernel launches at most: per_sm per SM (4 when interpreting)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return per_sm * _SM_COUNT[index]


_COUNTERS: dict = {}


def zeroed_counter(like: torch.Tensor) -> torch.Tensor:
    """An int32 [1] counter that is 0 when a kernel starts; the kernel resets it to 0 when done.

    Kernels whose last program reduces the partial results of all programs count arrivals in it.
    For real CUDA tensors one counter per (device, stream) is reused, since the kernel leaves it
    at 0, which saves a fill kernel per call. A fresh zero tensor is made instead while tracing
    (fake tensors), while a CUDA graph is being captured (graphs replay on streams of their own),
    and on the CPU.
    """
    if (like.is_cuda and not is_fake(like) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()):
        key = (like.device, torch.cuda.current_stream(like.device).cuda_stream)
        counter = _COUNTERS.get(key)
        if counter is None:
            counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=like.device)
        return counter
    return torch.zeros(1, dtype=torch.int32, device=like.device)


def on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere), cached."""
    if device.type != "cuda":
        return 1
    program_budget(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _SM_COUNT[index]


@triton.jit
def sum_partial_columns(partials_ptr, n_progs, width, cols, cols_ok, BLOCK_PROGS: tl.constexpr, DTYPE: tl.constexpr):
    """Sums over the programs of the columns ``cols`` (a block of indices, masked by ``cols_ok``)
    of the [n_progs, width] partials, in program order (deterministic). Read with .cg: the other
    programs wrote them, so they are not in this SM's L1."""
    sums = tl.zeros([cols.shape[0]], DTYPE)
    for g0 in range(0, n_progs, BLOCK_PROGS):
        g = g0 + tl.arange(0, BLOCK_PROGS)
        part = tl.load(partials_ptr + g.to(tl.int64)[:, None] * width + cols[None, :],
                       mask=(g < n_progs)[:, None] & cols_ok[None, :], other=0.0, cache_modifier=".cg")
        sums += tl.sum(part, axis=0)
    return sums


@triton.jit
def sum_partials(partials_ptr, n_progs, WIDTH: tl.constexpr, BLOCK_PROGS: tl.constexpr, DTYPE: tl.constexpr):
    """Column sums of the [n_progs, WIDTH] partials (all columns), as ``sum_partial_columns``."""
    cols = tl.arange(0, WIDTH)
    return sum_partial_columns(partials_ptr, n_progs, WIDTH, cols, cols < WIDTH, BLOCK_PROGS, DTYPE)


@triton.jit
def pick(values, INDEX: tl.constexpr):
    """values[INDEX] of a 1-D block, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, values.shape[0]) == INDEX, values, 0.0))
