"""Score loss (TIGAS): its configuration and the validation of a call's inputs (docs/losses.md
§3; the settings table's layout: ``layout.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import checks
from .layout import TERMS

REGRESSION_TYPES = ("mse", "smoothl1")
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class ScoreConfig:
    weights: tuple[float, float, float]  # TERMS order
    margin: float
    regression_type: str
    reduction: str

    @classmethod
    def build(cls, regression_weight=1.0, classification_weight=0.3, ranking_weight=0.2, regression_type="mse",
              margin=0.5, reduction="mean") -> ScoreConfig:
        values = (regression_weight, classification_weight, ranking_weight)
        weights = tuple(checks.real(f"{name}_weight", v) for name, v in zip(TERMS, values))
        return cls(weights, checks.real("margin", margin), checks.choice("regression_type", regression_type,
                                                                          REGRESSION_TYPES),
                   checks.choice("reduction", reduction, REDUCTIONS))

    def settings(self) -> torch.Tensor:
        """The float64 settings table the fused kernels read (slots: ``layout.SETTINGS``), on the CPU."""
        return torch.tensor(self.weights + (self.margin,), dtype=torch.float64)


def check_flat(name: str, value: torch.Tensor, B: int) -> None:
    """``value`` must be [B] or [B, 1] (every backend reads both along dim 0)."""
    if not (value.dim() == 1 or (value.dim() == 2 and value.shape[1] == 1)) or value.shape[0] != B:
        raise ValueError(f"{name} must be [B] or [B, 1] with B = {B}, got shape {tuple(value.shape)}")


def check_inputs(scores, logits, labels, *, need_logits: bool) -> None:
    """Validate one call's tensors (metadata only, no sync)."""
    checks.tensor("scores", scores, shape_doc="[B] or [B, 1]")
    if scores.dim() not in (1, 2) or (scores.dim() == 2 and scores.shape[1] != 1):
        raise ValueError(f"scores must be [B] or [B, 1], got shape {tuple(scores.shape)}")
    B = scores.shape[0]
    checks.tensor("labels", labels, shape_doc="[B] or [B, 1] of floats in [0, 1]")
    if labels.device != scores.device:
        raise ValueError(f"labels must be on scores' device {scores.device}, got {labels.device}")
    check_flat("labels", labels, B)
    if need_logits:
        checks.tensor("logits", logits, rank=2, shape_doc="[B, 2]")
        checks.same_tensor_kind("logits", logits, "scores", scores)
        if tuple(logits.shape) != (B, 2):
            raise ValueError(f"logits must be [B, 2] with B = {B}, got shape {tuple(logits.shape)}")
    if B >= 2**31:
        raise ValueError(f"scores may hold at most 2^31 - 1 values, got {B}")
