"""The blendshape operators' fake implementations (their outputs' shapes and dtypes, for
torch.compile and FakeTensorMode), shared by the C++ (cpu, cuda) and Triton operators.

``fusedloss::blendshape_forward(pred, target, raw_pred?, prev_pred?, settings, group_coef?,
landmark_gram?, landmark_rows, term_mask) -> (terms [n], total [], col_stats [2, C])`` computes
the n terms of ``term_mask`` (bit i: term i of ``layout.TERMS``). ``col_stats`` holds, per
column c = (t, k) of [T, K], the importance weight target.mean(0) and sum_b (pred - target)^2
(only for the default perceptual form, else [2, 0]); ``blendshape_backward`` reuses them.
Schemas: csrc/blendshape/blendshape.cpp; the math: csrc/blendshape/blendshape_math.h and
docs/losses.md §2.
"""

from __future__ import annotations

import math

from ..core.numerics import acc_dtype
from .layout import TERM_BIT


def needs_col_stats(term_mask: int, group_coef) -> bool:
    """The default perceptual form needs full column statistics (its weights are squared)."""
    return bool(term_mask & TERM_BIT["perceptual"]) and group_coef is None


def empty_outputs(pred, term_mask: int, group_coef):
    acc = acc_dtype(pred.dtype)
    columns = math.prod(pred.shape[1:]) if needs_col_stats(term_mask, group_coef) else 0
    return (pred.new_empty((bin(term_mask).count("1"),), dtype=acc), pred.new_empty((), dtype=acc),
            pred.new_empty((2, columns), dtype=acc))


def empty_gradients(pred, output_mask, has_raw: bool):
    return (
        pred.new_empty(pred.shape if output_mask[0] else (0,)),
        pred.new_empty(pred.shape if output_mask[1] else (0,)),
        pred.new_empty(pred.shape if output_mask[2] and has_raw else (0,)),
    )


def forward_fake(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows, term_mask):
    return empty_outputs(pred, term_mask, group_coef)


def backward_fake(grad_terms, grad_total, col_stats, pred, target, raw_pred, prev_pred, settings, group_coef,
                  landmark_gram, landmark_rows, term_mask, output_mask):
    return empty_gradients(pred, output_mask, raw_pred is not None)

