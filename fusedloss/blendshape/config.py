"""Blendshape loss (KoeMorph): its configuration, the validation of a call's inputs, and the
tables the fused kernels read (docs/losses.md §2; layout: ``layout.py``).

  group_coef[k] = sum over groups g of weight_g * (times k is in g) / |g|   (columns k >= G weigh 0)
  landmark_gram = M^T M of the landmark matrix M [J, K]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core import checks
from .layout import TERM_BIT, TERMS

# KoeMorph's sequential (dual-stream) trainer's groups: mouth and expression blendshapes of ARKit's 52.
DUAL_STREAM_GROUPS = ((tuple(range(12, 22)), 1.0), (tuple(range(0, 10)), 1.0))


@dataclass(frozen=True)
class BlendshapeConfig:
    weights: tuple[float, ...]  # TERMS order
    threshold: float
    groups: tuple[tuple[tuple[int, ...], float], ...] | None
    # Which weights are non-zero (the computed terms): what a fused call's plan reads, so that
    # under torch.compile a weight's value is never a constant of the graph, only its being 0.
    nonzero: tuple[bool, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nonzero", tuple(w != 0 for w in self.weights))

    @classmethod
    def build(cls, mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.0,
              landmark_weight=0.0, smoothing_weight=0.0, consistency_weight=0.0, threshold=0.1,
              perceptual_groups=None) -> BlendshapeConfig:
        values = (mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight,
                  smoothing_weight, consistency_weight)
        weights = tuple(checks.real(f"{name}_weight", v) for name, v in zip(TERMS, values))
        return cls(weights, checks.real("threshold", threshold), parse_groups(perceptual_groups))

    def weight(self, term: str) -> float:
        return self.weights[TERMS.index(term)]

    def settings(self) -> torch.Tensor:
        """The float64 settings table the fused kernels read (slots: ``layout.SETTINGS``), on the CPU."""
        return torch.tensor(self.weights + (self.threshold,), dtype=torch.float64)

    def group_coef(self) -> torch.Tensor | None:
        if self.groups is None:
            return None
        coef = [0.0] * (max(max(indices) for indices, _ in self.groups) + 1)
        for indices, weight in self.groups:
            for k in indices:
                coef[k] += weight / len(indices)
        return torch.tensor(coef, dtype=torch.float64)


def parse_groups(groups):
    if groups is None:
        return None
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise TypeError("perceptual_groups must be a non-empty sequence of (indices, weight) pairs")
    parsed = []
    for i, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or len(group) != 2:
            raise ValueError(f"perceptual_groups[{i}] must be (indices, weight), got {group!r}")
        indices, weight = group
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence) or not indices:
            raise ValueError(f"perceptual_groups[{i}] indices must be a non-empty sequence of column indices")
        indices = tuple(checks.integer(f"perceptual_groups[{i}] index", k) for k in indices)
        if min(indices) < 0:
            raise ValueError(f"perceptual_groups[{i}] indices must be >= 0, got {min(indices)}")
        parsed.append((indices, checks.real(f"perceptual_groups[{i}] weight", weight)))
    return tuple(parsed)


def computed_terms(nonzero: tuple[bool, ...], pred_dim: int, has_raw: bool,
                   has_prev: bool) -> tuple[tuple[str, ...], int]:
    """The terms a call computes (weight non-zero and inputs present; temporal needs [B, T, K]),
    and their bit mask in TERMS order."""
    present = {"temporal": pred_dim == 3, "smoothing": has_raw, "consistency": has_prev}
    terms = tuple(t for t, used in zip(TERMS, nonzero) if used and present.get(t, True))
    return terms, term_mask(terms)


def term_mask(terms: Sequence[str]) -> int:
    return sum(TERM_BIT[t] for t in terms)


def check_inputs(config: BlendshapeConfig, pred, target, raw_pred, prev_pred, landmark_matrix) -> None:
    """Validate one call's tensors against the configuration (metadata only, no sync). Reads only
    which weights are non-zero (``config.nonzero``), not their values."""
    uses = dict(zip(TERMS, config.nonzero))
    checks.tensor("pred", pred, shape_doc="[B, K] or [B, T, K]")
    if pred.dim() not in (2, 3):
        raise ValueError(f"pred must be [B, K] or [B, T, K], got shape {tuple(pred.shape)}")
    for name, value in (("target", target), ("raw_pred", raw_pred), ("prev_pred", prev_pred)):
        if value is None and name != "target":
            continue
        checks.tensor(name, value, shape_doc="like pred")
        checks.same_tensor_kind(name, value, "pred", pred)
        checks.shape(name, value, pred.shape, "pred's shape")
    K = pred.shape[-1]
    if K < 1 or (pred.dim() == 3 and pred.shape[1] < 1):
        raise ValueError(f"pred must have at least one frame and one blendshape, got shape {tuple(pred.shape)}")
    if uses["perceptual"] and config.groups is not None:
        for i, (indices, _) in enumerate(config.groups):
            if max(indices) >= K:
                raise ValueError(f"perceptual_groups[{i}] index {max(indices)} is out of range for K = {K}")
    if uses["landmark"]:
        if landmark_matrix is None:
            raise ValueError("landmark_matrix [J, K] is required when landmark_weight is non-zero")
        checks.tensor("landmark_matrix", landmark_matrix, rank=2, shape_doc="[J, K]")
        if landmark_matrix.shape[1] != K or landmark_matrix.shape[0] < 1:
            raise ValueError(f"landmark_matrix must be [J, K] with K = {K}, got {tuple(landmark_matrix.shape)}")
        if landmark_matrix.device != pred.device:
            raise ValueError(f"landmark_matrix must be on pred's device {pred.device}, got {landmark_matrix.device}")


def landmark_gram(landmark_matrix: torch.Tensor) -> torch.Tensor:
    """M^T M in float64: sum_j ((e @ M^T)_j)^2 = e^T (M^T M) e. No gradient to M."""
    m = landmark_matrix.detach().to(torch.float64)
    return m.T @ m
