"""docs/losses.md §1 in plain PyTorch, literally: the oracle of the tests and the ``"reference"``
backend. Arithmetic is float32 (float64 for float64 inputs); autograd returns each gradient in
its input's dtype."""

from __future__ import annotations

import torch

from ..core.numerics import mean_or_zero
from .config import PVAConfig


def to_acc(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def pva_loss_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: torch.Tensor | None,
    config: PVAConfig,
    dim_ws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """docs/losses.md §1: per-part position / velocity / acceleration loss (Ditto), literally.

    Returns ``(total, terms)``; ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to 0-dim tensors and does
    not hold ``total``.
    """
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pred, target, cond_frame, dim_ws = (to_acc(x, acc) for x in (pred, target, cond_frame, dim_ws))
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
        terms[f"{name}_P"] = mean_or_zero(err(p, t) * weight)
        vp, vt = p[:, 1:] - p[:, :-1], t[:, 1:] - t[:, :-1]
        terms[f"{name}_V"] = mean_or_zero(err(vp, vt) * weight)
        ap, at = vp[:, 1:] - vp[:, :-1], vt[:, 1:] - vt[:, :-1]
        terms[f"{name}_A"] = mean_or_zero(err(ap, at) * weight)
        if config.use_last_frame:
            terms[f"{name}_L"] = mean_or_zero(err(p[:, 0], cond_frame[:, s:e]) * weight)
        if config.use_reg:
            terms[f"{name}_R"] = reg_w * mean_or_zero(p.abs())
    total = sum(terms.values())
    return total, terms
