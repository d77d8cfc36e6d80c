"""docs/losses.md §2 in plain PyTorch, literally: the oracle of the tests and the ``"reference"``
backend. Arithmetic is float32 (float64 for float64 inputs)."""

from __future__ import annotations

import torch

from ..core.numerics import mean_or_zero
from .config import BlendshapeConfig
from .layout import TERMS


def blendshape_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: torch.Tensor | None,
    prev_pred: torch.Tensor | None,
    config: BlendshapeConfig,
    landmark_matrix: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """docs/losses.md §2: MSE + L1 + perceptual (+ temporal, landmark, smoothing, consistency), KoeMorph.

    Returns the computed terms, unweighted, and ``"total"`` (their weighted sum). A term is computed
    when its weight is non-zero and its inputs are given (temporal needs [B, T, K] input).
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, t = pred.to(acc), target.to(acc)
    w = dict(zip(TERMS, config.weights))
    terms: dict[str, torch.Tensor] = {}
    if w["mse"]:
        terms["mse"] = mean_or_zero((p - t) ** 2)
    if w["l1"]:
        terms["l1"] = mean_or_zero((p - t).abs())
    if w["perceptual"]:
        if config.groups is not None:
            terms["perceptual"] = sum(
                weight * mean_or_zero((p[..., list(idx)] - t[..., list(idx)]) ** 2) for idx, weight in config.groups
            )
        else:
            active = active_fraction(pred, target, config.threshold)
            importance = t.sum(dim=0) / max(t.shape[0], 1)  # target.mean(dim=0); 0 for an empty batch
            weighted = mean_or_zero((p * importance - t * importance) ** 2)
            terms["perceptual"] = active + weighted
    if w["temporal"] and p.dim() == 3:
        terms["temporal"] = mean_or_zero(((p[:, 1:] - p[:, :-1]) - (t[:, 1:] - t[:, :-1])) ** 2)
    if w["landmark"]:
        m = landmark_matrix.detach().to(acc)
        terms["landmark"] = mean_or_zero(((p - t) @ m.T) ** 2)
    if w["smoothing"] and raw_pred is not None:
        terms["smoothing"] = mean_or_zero((p - raw_pred.to(acc)).abs())
    if w["consistency"] and prev_pred is not None:
        terms["consistency"] = mean_or_zero((p - prev_pred.detach().to(acc)) ** 2)
    total = sum((w[name] * value for name, value in terms.items()), (p * 0).sum())
    terms["total"] = total
    return terms


def active_fraction(pred: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """The default perceptual form's ``active`` part: the fraction of elements where exactly one of
    pred and target exceeds the threshold, compared in the inputs' dtype (as PyTorch compares a
    tensor with a Python float). No gradient."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return mean_or_zero(((pred > threshold).to(acc) - (target > threshold).to(acc)) ** 2)
