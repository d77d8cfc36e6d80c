"""``check_finite`` (docs/losses.md §3.7): one host sync per call, in an operator so that
torch.compile keeps it in the graph."""

from __future__ import annotations

import torch

from .layout import STATUS


@torch.library.custom_op("fusedloss::finite_or_raise", mutates_args=())
def finite_or_raise(total: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
    """``total`` (a copy), after one host sync on ``status``; raises RuntimeError naming the first
    non-finite value in scores, logits, or the total."""
    bits = int(status.item())
    for name, bit in STATUS.items():
        if bits & bit:
            raise RuntimeError(f"CombinedLoss: NaN/Inf detected in {name} (check_finite=True)")
    return total.clone()


@finite_or_raise.register_fake
def _(total, status):
    return torch.empty_like(total)


def _finite_or_raise_backward(ctx, grad):
    return grad, None


finite_or_raise.register_autograd(_finite_or_raise_backward)


def status_of(scores: torch.Tensor, logits: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor:
    """The status bits from PyTorch ops (the reference backend's; the fused kernels make their own)."""
    status = ((~torch.isfinite(scores).all()).to(torch.int32) * STATUS["scores"]
              | (~torch.isfinite(total)).to(torch.int32) * STATUS["total"])
    if logits is not None:
        status = status | (~torch.isfinite(logits).all()).to(torch.int32) * STATUS["logits"]
    return status
