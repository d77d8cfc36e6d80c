"""The losses over the global batch of a ``torch.distributed`` process group (docs/losses.md §5).

With ``process_group=`` a group of W ranks, each rank passes its own slice of the batch (any
size, empty included). Every rank returns the loss and terms of the **whole batch**, the slices
concatenated in rank order, as one process would compute them. The gradient a rank passes to its
slice is W times the whole-batch gradient of that slice, so DistributedDataParallel's averaging
of parameter gradients gives exactly the single-process gradient (it is what a gather with a
summing backward would give). No collective runs in backward: once the forward's collectives
have run, each rank knows its share of every gradient.

What crosses the wire is what the loss needs, never a ``[B, L, D]`` or ``[B, T, K]`` tensor:
  means   a term that is a mean over a set whose size is proportional to the batch (every term
          of §1, and of §2 but the importance-weighted perceptual part) is, over the whole batch,
              T = sum_r B_r T_r / B,    B = sum_r B_r,
          so one all_reduce of [B_r T_r, ..., B_r] gives every rank T, and dT/dT_r = B_r / B.
  sums    a column statistic S = sum_r S_r (sum_b target, sum_b e^2) has dS/dS_r = 1.
  gather  the ranking compares every pair of the whole batch: its O(B) inputs (scores, logits,
          labels) are gathered, and the family's own fused kernel runs on the whole batch.
The host reads nothing from the device; only the gather's row counts (host integers) cross
between hosts, over a CPU (gloo) group.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist


def check_group(process_group):
    """``process_group`` as given (None: the local batch), or a ``TypeError``/``ValueError``."""
    if process_group is None:
        return None
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
                        f"or None, got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group: this process is not a member of the group")
    return process_group


def world_of(group) -> tuple[int, int]:
    """(size, this process's rank) in ``group``."""
    return dist.get_world_size(group), dist.get_rank(group)


def reduce_stats(means: torch.Tensor, sums: torch.Tensor, batch: int, group):
    """(means [n], sums [m]) of this rank's ``batch`` rows -> the whole batch's (means, sums, batch
    size B) and ``mean_scale`` = W * batch / B, the factor of this rank's share of a mean's
    gradient (0-dim device tensors): one all_reduce of [batch * means, sums, batch], no autograd."""
    world = dist.get_world_size(group)
    stats = torch.cat([means.detach() * batch, sums.detach(), means.new_full((1,), batch)])
    dist.all_reduce(stats, group=group)
    n, m = means.shape[0], sums.shape[0]
    total_batch = stats[n + m]
    denominator = total_batch.clamp_min(1)  # B = 0: every mean and sum is 0
    return stats[:n] / denominator, stats[n:n + m].clone(), total_batch.clone(), (world * batch) / denominator


class _GlobalStats(torch.autograd.Function):
    """``reduce_stats`` with its gradient: d(mean)/d(local mean) = batch / B and d(sum)/d(local sum)
    = 1, each times W (the DDP convention of this module's docstring)."""

    @staticmethod
    def forward(ctx, means, sums, batch: int, group):
        global_means_, global_sums, total_batch, ctx.mean_scale = reduce_stats(means, sums, batch, group)
        ctx.world = dist.get_world_size(group)
        ctx.mark_non_differentiable(total_batch)
        return global_means_, global_sums, total_batch

    @staticmethod
    def backward(ctx, grad_means, grad_sums, grad_batch):
        return (None if grad_means is None else grad_means * ctx.mean_scale,
                None if grad_sums is None else grad_sums * ctx.world, None, None)


def global_stats(means: torch.Tensor, sums: torch.Tensor, batch: int, group):
    """The whole batch's (means, sums, batch size) from this rank's (``batch`` rows), see _GlobalStats."""
    return _GlobalStats.apply(means, sums, batch, group)


def global_means(values: torch.Tensor, batch: int, group) -> torch.Tensor:
    """The whole batch's values of means over sets proportional to the batch (this rank's: ``values``)."""
    return _GlobalStats.apply(values, values.new_empty((0,)), batch, group)[0]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x, factor: int):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_HOST_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _host_group(group):
    """A group over ``group``'s ranks that carries CPU tensors: ``group`` itself when it has a
    CPU backend (gloo, or "cpu:gloo,cuda:nccl"), otherwise a gloo twin made on first use by the
    group's members alone."""
    if "gloo" in str(dist.get_backend(group)):
        return group
    twin = _HOST_GROUPS.get(group)
    if twin is None:
        twin = dist.new_group(ranks=dist.get_process_group_ranks(group), backend="gloo",
                              use_local_synchronization=True)
        _HOST_GROUPS[group] = twin
    return twin


def batch_sizes(batch: int, group) -> list[int]:
    """Every rank's batch size, in rank order: a host collective of integers (no device sync).
    Under torch.compile it is a graph break (host integers that size the gather)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_exchange_sizes)(batch, group)
    return _exchange_sizes(batch, group)


def _exchange_sizes(batch: int, group) -> list[int]:
    world = dist.get_world_size(group)
    sizes = torch.empty(world, dtype=torch.int64)
    _all_gather(sizes, torch.tensor([batch], dtype=torch.int64), group=_host_group(group))
    return sizes.tolist()


def gather_batch(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Every rank's rows of each tensor (same trailing shape and dtype on every rank), concatenated
    in rank order. This rank's rows keep their autograd history, their gradient times W; the other
    ranks' are constants. One gather of the rows packed as float64 (exact for every float dtype),
    padded to the largest slice."""
    world, rank = world_of(group)
    like = tensors[0]
    sizes = batch_sizes(like.shape[0], group)
    widths = [math.prod(x.shape[1:]) for x in tensors]
    longest = max(sizes)
    gathered = None
    if longest:
        packed = like.new_zeros((longest, sum(widths)), dtype=torch.float64)
        if like.shape[0]:
            packed[:like.shape[0]] = torch.cat([x.detach().reshape(x.shape[0], -1).to(torch.float64)
                                                for x in tensors], dim=1)
        gathered = packed.new_empty((world * longest, packed.shape[1]))
        _all_gather(gathered, packed, group=group)
    out = []
    start = 0
    for x, width in zip(tensors, widths):
        pieces = []
        for r, size in enumerate(sizes):
            if r == rank:
                pieces.append(_ScaleGrad.apply(x, world))
            elif size:
                rows = gathered[r * longest: r * longest + size, start:start + width]
                pieces.append(rows.reshape((size,) + tuple(x.shape[1:])).to(x.dtype))
        out.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        start += width
    return out

