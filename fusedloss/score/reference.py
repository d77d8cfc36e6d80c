"""docs/losses.md §3 in plain PyTorch, literally: the oracle of the tests and the ``"reference"``
backend. Arithmetic is float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch

from ..core.numerics import mean_or_zero
from .config import ScoreConfig


def all_pairs_margin_ranking_reference(
    scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """docs/losses.md §3's ranking term, literally: the [B, B] pair matrix of max(0, m - (s_i - s_j)) over
    i real (label > 0.5) and j fake, summed, or averaged over the |R| |F| pairs (0 without pairs).

    Pairs are selected by a mask rather than by indexing, so nothing syncs and torch.compile can
    trace it; memory is O(B^2): for tests and small batches.
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.reshape(-1).to(acc)
    real = labels.detach().reshape(-1) > 0.5
    pair = real[:, None] & ~real[None, :]
    # Inactive pairs hold exactly 0 and pass no gradient (clamp_min's gradient is 1 where >= 0).
    hinge = (margin - (s[:, None] - s[None, :])).clamp_min(0) * pair
    total = hinge.sum()
    if reduction == "sum":
        return total
    pairs = pair.sum()
    return total / pairs.clamp_min(1).to(acc)


def score_loss_reference(
    scores: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, config: ScoreConfig
) -> dict[str, torch.Tensor]:
    """docs/losses.md §3: regression + classification + all-pairs margin ranking (TIGAS), literally.

    Returns ``regression``, ``classification``, ``ranking`` and ``total``. Labels are targets: no
    gradient flows to them.
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.reshape(-1).to(acc)
    y = labels.detach().reshape(-1)
    target = y.to(acc)
    if config.regression_type == "smoothl1":
        regression = mean_or_zero(torch.nn.functional.smooth_l1_loss(s, target, reduction="none", beta=1.0))
    else:
        regression = mean_or_zero((s - target) ** 2)
    classes = (y > 0.5).long()
    classification = mean_or_zero(torch.nn.functional.cross_entropy(logits.to(acc), classes, reduction="none"))
    ranking = all_pairs_margin_ranking_reference(scores, y, config.margin, config.reduction)
    w_reg, w_cls, w_rank = config.weights
    total = w_reg * regression + w_cls * classification + w_rank * ranking
    return {"regression": regression, "classification": classification, "ranking": ranking, "total": total}
