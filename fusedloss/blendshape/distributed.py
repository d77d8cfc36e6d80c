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

import math

import torch

from ..core import distributed
from ..core.numerics import acc_dtype
from .config import BlendshapeConfig
from .layout import COL_IMPORTANCE, COL_SQ_ERR, TERMS
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


class FusedOverGroup(torch.autograd.Function):
    """A fused blendshape forward over ``group``: the backend's forward operator on this rank's
    slice, then the reduction; and its backward: the backend's backward operator with the
    gradients scaled and the whole batch's column statistics (see the module docstring).
    ``operators`` is (forward, backward) of one backend (``functional.operators``). Returns
    (terms [n], total)."""

    @staticmethod
    def forward(ctx, pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows,
                term_mask, computed, weight_index, operators, group):
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
        means, sums, total_batch, ctx.mean_scale = distributed.reduce_stats(means, sums, batch, group)
        if default_perceptual:
            importance = sums[:columns] / total_batch.clamp_min(1)
            means[i] += _weighted(importance, sums[columns:], total_batch, columns)
            col_stats = torch.stack([importance, sums[columns:] * (batch / total_batch.clamp_min(1))])
        total = (settings.index_select(0, weight_index).to(acc) * means).sum()
        ctx.save_for_backward(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, col_stats)
        ctx.call = (landmark_rows, term_mask, operators[1])
        return means, total

    @staticmethod
    def backward(ctx, grad_terms, grad_total):
        pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, col_stats = ctx.saved_tensors
        landmark_rows, term_mask, backward_op = ctx.call
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]) and raw_pred is not None]
        if not any(mask):
            return (None,) * 13
        if pred.shape[0] == 0:
            grads = [torch.zeros_like(x) if x is not None else None for x in (pred, target, raw_pred)]
        else:
            scale = ctx.mean_scale
            grads = backward_op(grad_terms * scale, grad_total * scale, col_stats, pred, target, raw_pred, prev_pred,
                                settings, group_coef, landmark_gram, landmark_rows, term_mask, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 10
