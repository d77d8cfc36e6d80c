"""The blendshape loss over the global batch of a process group (docs/losses.md §5,
core/distributed.py for the convention).

Every term but one is a mean over a set proportional to the batch (N = B*T*K elements, B*T rows,
B*(T-1)*K differences, B*T*J landmarks), so its whole-batch value is one all_reduce of this rank's.
The exception is the weighted part of the default perceptual form,
    weighted = sum_c w_c^2 S2_c / N,   w = sum_b target / B (the importance weights),  S2 = sum_b e^2,
whose w and S2 are column sums over the whole batch. So each rank sends, in one all_reduce:
B_r * (its terms, with ``perceptual`` replaced by its ``active`` part), sum_b target and S2 of
its rows ([T*K] each), and B_r.

The fused backward of a rank then needs no collective. Scaling the gradients reaching the terms by
W * B_r / B (a mean's share, core/distributed.py) and handing the kernel the column statistics
    (w, S2 * B_r / B)   of the whole batch, in place of its slice's (w_r, S2_r),
makes its unchanged formulas (docs/losses.md §2.5; B, N are the slice's there) give exactly W
times the whole-batch gradient: 2 c w^2 e with c = W g / N for pred, and, through w, the target
term 2 c w_c S2_c / B of the whole batch.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..core import distributed
from ..core.autograd import terms_function
from ..core.numerics import acc_dtype
from .config import BlendshapeConfig
from .layout import COL_IMPORTANCE, COL_SQ_ERR, CONSTANTS, GRAD_INPUTS, TERMS
from .reference import active_fraction, blendshape_loss_reference


def reference_over_group(pred, target, raw_pred, prev_pred, config: BlendshapeConfig, landmark_matrix, group):
    """The reference backend over ``group`` (plain PyTorch autograd on the reduced statistics):
    returns (total, terms)."""
    acc = acc_dtype(pred.dtype)
    terms = blendshape_loss_reference(pred, target, raw_pred, prev_pred, config, landmark_matrix)
    terms.pop("total")
    names = tuple(terms)
    default_perceptual = "perceptual" in terms and config.groups is None
    sums = pred.new_zeros((0,), dtype=acc)
    if default_perceptual:
        p, t = pred.to(acc), target.to(acc)
        terms["perceptual"] = active_fraction(pred, target, config.threshold)
        sums = torch.cat([t.sum(dim=0).flatten(), ((p - t) ** 2).sum(dim=0).flatten()])
    values = torch.stack(list(terms.values())) if terms else pred.new_zeros((0,), dtype=acc)
    means, sums, batch = distributed.global_stats(values, sums, pred.shape[0], group)
    out = dict(zip(names, means.unbind(0)))
    if default_perceptual:
        columns = sums.shape[0] // 2
        importance = sums[:columns] / batch.clamp_min(1)
        out["perceptual"] = out["perceptual"] + _weighted(importance, sums[columns:], batch, columns)
    weights = dict(zip(TERMS, config.weights))
    total = sum((weights[name] * value for name, value in out.items()), (pred.to(acc) * 0).sum())
    return total, out


def _weighted(importance, sq_err, batch, columns):
    """sum_c w_c^2 S2_c / N of the whole batch (N = B * columns; 0 for B = 0)."""
    return (importance.square() * sq_err).sum() / (batch.clamp_min(1) * columns)


def _forward_over_group(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows,
                        term_mask, operators, computed, weight_index, group):
    """The forward operator on this rank's slice, then one all_reduce of its terms and column
    statistics: the whole batch's (terms [n], total, col_stats [2, T*K], mean_scale)."""
    acc = acc_dtype(pred.dtype)
    batch = pred.shape[0]
    default_perceptual = "perceptual" in computed and group_coef is None
    columns = math.prod(pred.shape[1:]) if default_perceptual else 0
    if batch:
        terms, _, col_stats = operators[0](pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram,
                                           landmark_rows, term_mask)
    else:  # an empty slice: its sums are 0, and so is its share of every gradient
        terms, col_stats = pred.new_zeros((len(computed),), dtype=acc), pred.new_zeros((2, columns), dtype=acc)
    means, sums = terms, terms.new_zeros((0,))
    if default_perceptual:
        i = computed.index("perceptual")
        importance, sq_err = col_stats[COL_IMPORTANCE], col_stats[COL_SQ_ERR]
        means = terms.clone()
        means[i] -= (importance.square() * sq_err).sum() / max(batch * columns, 1)  # -> the active part
        sums = torch.cat([importance * batch, sq_err])
    means, sums, total_batch, mean_scale = distributed.reduce_stats(means, sums, batch, group)
    if default_perceptual:
        importance = sums[:columns] / total_batch.clamp_min(1)
        means[i] += _weighted(importance, sums[columns:], total_batch, columns)
        col_stats = torch.stack([importance, sums[columns:] * (batch / total_batch.clamp_min(1))])
    total = (settings.index_select(0, weight_index).to(acc) * means).sum()
    return means, total, col_stats, mean_scale


def _backward_over_group(grad_terms, grad_total, col_stats, mean_scale, pred, target, raw_pred, *rest):
    """The backward operator with the gradients times ``mean_scale`` and the whole batch's column
    statistics; zeros for an empty slice."""
    *inputs, operators, computed, weight_index, group, mask = rest
    if pred.shape[0] == 0:
        return [torch.zeros_like(x) if wanted else None for x, wanted in zip((pred, target, raw_pred), mask)]
    return operators[1](grad_terms * mean_scale, grad_total * mean_scale, col_stats, pred, target, raw_pred, *inputs,
                        mask)


# The operators' call form and autograd formula (core/autograd.py); the aux outputs are col_stats
# and mean_scale.
_over_group = terms_function(_forward_over_group, _backward_over_group, GRAD_INPUTS, num_aux=2, constants=CONSTANTS,
                             name="blendshape_over_group",
                             arguments=tuple(inspect.signature(_forward_over_group).parameters))


def fused_over_group(operators, computed: tuple[str, ...], weight_index: torch.Tensor, group):
    """A fused backend's operators (``functional.operators``: forward, backward) over ``group``,
    called as the forward operator and with its autograd formula (core/autograd.py):
      forward   the forward operator on this rank's slice, then one all_reduce (``reduce_stats``):
                the whole batch's terms and total
      backward  the backward operator with the gradients times W * B_r / B (a mean's share) and
                the whole batch's column statistics (see the module docstring)
    ``computed`` names the terms the forward computes; ``weight_index`` [n] their slots of the
    settings table."""

    def forward(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows, term_mask):
        return _over_group(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows,
                           term_mask, operators, computed, weight_index, group)

    return forward
