"""Data-parallel training: what the engine does differently under ``torchrun``.

``torchrun --nproc_per_node=N -m fusedloss train <system>`` starts N processes with the
environment variables ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. The engine then
  - joins the process group (gloo for CPU tensors and NCCL for CUDA ones: one
    ``"cpu:gloo,cuda:nccl"`` group; on CUDA each process takes GPU ``LOCAL_RANK``),
  - wraps the model in DistributedDataParallel (BatchNorm becomes SyncBatchNorm on CUDA; PyTorch
    has no CPU SyncBatchNorm, so on CPU BatchNorm normalises each rank's rows alone),
  - gives each rank its rows of every global batch (``rows_of``: the batch of a one-process run,
    split as evenly as possible, in rank order),
  - sets the loss's ``process_group``, so that every rank computes the loss of the whole global
    batch and DDP's averaged gradient is the one-process gradient (docs/losses.md §5),
  - logs, plots, validates and writes checkpoints on rank 0 only.
With no dropout and no batch statistics in the model (or with them synchronised), N processes
train the same weights as one process on the same global batches, up to rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the group it trains with."""

    world: int
    rank: int
    group: object
    owns_group: bool   # the engine made the group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> tuple[Ranks | None, torch.device]:
    """(Ranks, this rank's device) under torchrun or in an initialised group of several ranks;
    (None, device) in a single process. ``device`` is the configured one: a CUDA device becomes
    ``cuda:LOCAL_RANK``."""
    owns = False
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return None, device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        # Both backends in one group: NCCL for CUDA tensors, gloo for CPU ones (the score loss's row counts).
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        owns = True
    elif dist.get_world_size() == 1:
        return None, device
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(dist.get_world_size(), dist.get_rank(), dist.group.WORLD, owns), device


def leave(ranks: Ranks | None, finished: bool) -> None:
    """Destroy the group the engine made. After a finished run, every rank first meets the others
    at a barrier, which holds no tensor made in Python.

    Why: gloo's worker thread drops its reference to a collective's tensors after the waiting rank
    has already gone on. A tensor made in Python whose last reference goes there needs the GIL to
    free its Python object. The last collective of a run is the checkpoint's
    ``all_gather_object``, whose tensors torch drops as it returns; a rank with nothing left to do
    (rank 1: rank 0 still writes the files) went on to exit, and when the worker, delayed on a
    loaded machine, asked for the GIL as the interpreter began to finalize, Python ended that
    thread inside a C++ destructor: ``terminate called without an active exception``, SIGABRT.
    (The group cannot be relied on to join its threads: with DistributedDataParallel it outlives
    ``destroy_process_group`` in torch 2.13.) At the barrier the rank waits for the slowest one,
    with the GIL released, while the worker finishes with the checkpoint's tensors.
    Not after an error: the other ranks may never reach the barrier."""
    if ranks is not None and ranks.owns_group and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rows_of(batch: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s rows of a global batch of ``batch`` samples: the first ``batch % world``
    ranks take one more row than the others."""
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel, its BatchNorm layers synchronised on CUDA."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (pickled; for checkpoints, not steps)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value's maximum over the ranks (so that a decision made from them is the same everywhere)."""
    names = list(values)
    on = device if "gloo" not in str(dist.get_backend()) else torch.device("cpu")
    t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))
