"""SPEC.md in plain PyTorch: the oracle of every test and the ``"reference"`` backend.

Written to read like the specification, not to be fast. Arithmetic is float32 (float64 for
float64 inputs); autograd returns each gradient in its input's dtype.
"""

from __future__ import annotations

import torch

from .ops.blendshape import BlendshapeConfig
from .ops.pva import PVAConfig
from .ops.score import ScoreConfig


def _acc(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Plain mean; the mean over an empty set is 0 (and passes no gradient)."""
    return x.sum() / max(x.numel(), 1)


def pva_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: torch.Tensor | None,
    config: PVAConfig,
    dim_ws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPEC §1: per-part position / velocity / acceleration loss (Ditto), literally.

    Returns ``(total, terms)``; ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to 0-dim tensors and does
    not hold ``total``.
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pred, target, cond_frame, dim_ws = (_acc(x, acc) for x in (pred, target, cond_frame, dim_ws))
    if config.loss_type == "l1":
        def err(a, b):
            return (a - b).abs()
    else:
        def err(a, b):
            return (a - b) ** 2

    D = pred.shape[-1]
    terms: dict[str, torch.Tensor] = {}
    for name, (s, e), w, reg_w in zip(
        config.names, config.resolved_spans(D), config.weights, config.reg_weights
    ):
        weight = w * dim_ws[s:e] if dim_ws is not None else w
        p, t = pred[..., s:e], target[..., s:e]
        terms[f"{name}_P"] = _mean(err(p, t) * weight)
        vp, vt = p[:, 1:] - p[:, :-1], t[:, 1:] - t[:, :-1]
        terms[f"{name}_V"] = _mean(err(vp, vt) * weight)
        ap, at = vp[:, 1:] - vp[:, :-1], vt[:, 1:] - vt[:, :-1]
        terms[f"{name}_A"] = _mean(err(ap, at) * weight)
        if config.use_last_frame:
            terms[f"{name}_L"] = _mean(err(p[:, 0], cond_frame[:, s:e]) * weight)
        if config.use_reg:
            terms[f"{name}_R"] = reg_w * _mean(p.abs())
    total = sum(terms.values())
    return total, terms


def blendshape_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: torch.Tensor | None,
    prev_pred: torch.Tensor | None,
    config: BlendshapeConfig,
    landmark_matrix: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """SPEC §2: MSE + L1 + perceptual (+ temporal, landmark, smoothing, consistency), KoeMorph.

    Returns the computed terms, unweighted, and ``"total"`` (their weighted sum). A term is computed
    when its weight is non-zero and its inputs are given (temporal needs [B, T, K] input).
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    p, t = pred.to(acc), target.to(acc)
    w = dict(zip(("mse", "l1", "perceptual", "temporal", "landmark", "smoothing", "consistency"), config.weights))
    terms: dict[str, torch.Tensor] = {}
    if w["mse"]:
        terms["mse"] = _mean((p - t) ** 2)
    if w["l1"]:
        terms["l1"] = _mean((p - t).abs())
    if w["perceptual"]:
        if config.groups is not None:
            terms["perceptual"] = sum(
                weight * _mean((p[..., list(idx)] - t[..., list(idx)]) ** 2) for idx, weight in config.groups
            )
        else:
            # Compared in the inputs' dtype, as PyTorch compares a tensor with a Python float.
            active = _mean(((pred > config.threshold).to(acc) - (target > config.threshold).to(acc)) ** 2)
            importance = t.sum(dim=0) / max(t.shape[0], 1)  # target.mean(dim=0); 0 for an empty batch
            weighted = _mean((p * importance - t * importance) ** 2)
            terms["perceptual"] = active + weighted
    if w["temporal"] and p.dim() == 3:
        terms["temporal"] = _mean(((p[:, 1:] - p[:, :-1]) - (t[:, 1:] - t[:, :-1])) ** 2)
    if w["landmark"]:
        m = landmark_matrix.detach().to(acc)
        terms["landmark"] = _mean(((p - t) @ m.T) ** 2)
    if w["smoothing"] and raw_pred is not None:
        terms["smoothing"] = _mean((p - raw_pred.to(acc)).abs())
    if w["consistency"] and prev_pred is not None:
        terms["consistency"] = _mean((p - prev_pred.detach().to(acc)) ** 2)
    total = sum((w[name] * value for name, value in terms.items()), (p * 0).sum())
    terms["total"] = total
    return terms


def all_pairs_margin_ranking_reference(
    scores: torch.Tensor, labels: torch.Tensor, margin: float = 0.5, reduction: str = "mean"
) -> torch.Tensor:
    """SPEC §3's ranking term, literally: the [B, B] pair matrix of max(0, m - (s_i - s_j)) over
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
    """SPEC §3: regression + classification + all-pairs margin ranking (TIGAS), literally.

    Returns ``regression``, ``classification``, ``ranking`` and ``total``. Labels are targets: no
    gradient flows to them.
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.reshape(-1).to(acc)
    y = labels.detach().reshape(-1)
    target = y.to(acc)
    if config.regression_type == "smoothl1":
        regression = _mean(torch.nn.functional.smooth_l1_loss(s, target, reduction="none", beta=1.0))
    else:
        regression = _mean((s - target) ** 2)
    classes = (y > 0.5).long()
    classification = _mean(torch.nn.functional.cross_entropy(logits.to(acc), classes, reduction="none"))
    ranking = all_pairs_margin_ranking_reference(scores, y, config.margin, config.reduction)
    w_reg, w_cls, w_rank = config.weights
    total = w_reg * regression + w_cls * classification + w_rank * ranking
    return {"regression": regression, "classification": classification, "ranking": ranking, "total": total}
