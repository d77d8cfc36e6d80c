"""The score operators' fake implementations (their outputs' shapes and dtypes, for
torch.compile and FakeTensorMode), shared by the C++ (cpu, cuda) and Triton operators.

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
from .layout import RANKING_ONLY, TERM_BIT


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

