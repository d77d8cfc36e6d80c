"""The score operators' Python side, shared by the C++ (cpu, cuda) and Triton backends, and the
finiteness check.

``fusedloss::score_forward(scores, logits?, labels, settings, term_mask, smooth_l1, ranking_sum)
-> (terms [3], total [], counts, rank_scale, status)``:
  counts      int32 [B]: the signed number of active pairs of each score (-n for a real score,
              +n for a fake one), the ranking's gradient up to rank_scale; [0] without ranking
  rank_scale  float64 []: 1 / (|R| |F|) for reduction "mean" (0 without pairs), 1 for "sum"
  status      int32 []: the bits of ``layout.STATUS``
``score_backward`` maps d(loss)/d(terms) and d(loss)/d(total) to the gradients of scores and
logits. Schemas: csrc/score/score.cpp; the math: csrc/score/score_math.h and docs/losses.md §3.
"""

from __future__ import annotations

import torch

from ..core.numerics import acc_dtype
from .layout import RANKING_ONLY, STATUS, TERM_BIT

# ---------------------------------------------------------------------------------------------
# Fail-fast: one host sync per call, in an operator so torch.compile keeps it in the graph
# ---------------------------------------------------------------------------------------------


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


def forward_fake(scores, logits, labels, settings, term_mask, smooth_l1, ranking_sum):
    acc = acc_dtype(scores.dtype)
    B = scores.shape[0] if term_mask & RANKING_ONLY else 0
    return (scores.new_empty((3,), dtype=acc), scores.new_empty((), dtype=acc),
            scores.new_empty((B,), dtype=torch.int32), scores.new_empty((), dtype=torch.float64),
            scores.new_empty((), dtype=torch.int32))


def backward_fake(grad_terms, grad_total, counts, rank_scale, scores, logits, labels, settings, term_mask, smooth_l1,
                  ranking_sum, output_mask):
    with_logits = output_mask[1] and term_mask & TERM_BIT["classification"]
    return (scores.new_empty(scores.shape if output_mask[0] else (0,)),
            logits.new_empty((scores.shape[0], 2)) if with_logits else scores.new_empty((0,)))


# scores and logits receive gradients; labels (2) are targets, constants of the loss (no gradient).
GRAD_INPUTS = (0, 1)
