"""Blendshape loss (KoeMorph): configuration, input validation, and operator glue.

The fused kernels read every setting as runtime data, so a weight changed between steps (seed
001's schedules) recompiles nothing:
  settings      float64 [8]: the 7 term weights (TERMS order), then the threshold
  group_coef    float64 [G]: the group form of the perceptual term as a per-column weight,
                group_coef[k] = sum over groups g of weight_g * (times k is in g) / |g|
                (columns k >= G weigh 0)
  landmark_gram float64 [K, K]: M^T M of the landmark matrix M [J, K]
and the set of computed terms, a bit mask in TERMS order (``term_mask``). Each backend's forward
returns (terms [n], total [], col_stats [2, C]) where col_stats holds, per column c = (t, k) of
[T, K], the importance weight target.mean(0) and sum_b (pred - target)^2 (only for the default
perceptual form, else [2, 0]); the backward reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _checks
from ._autograd import register_terms_autograd

TERMS = ("mse", "l1", "perceptual", "temporal", "landmark", "smoothing", "consistency")
# Seed 001's dual-stream groups: mouth and expression blendshapes of ARKit's 52.
SEED_001_GROUPS = ((tuple(range(12, 22)), 1.0), (tuple(range(0, 10)), 1.0))


@dataclass(frozen=True)
class BlendshapeConfig:
    weights: tuple[float, ...]  # TERMS order
    threshold: float
    groups: tuple[tuple[tuple[int, ...], float], ...] | None

    @classmethod
    def build(cls, mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.0,
              landmark_weight=0.0, smoothing_weight=0.0, consistency_weight=0.0, threshold=0.1,
              perceptual_groups=None) -> BlendshapeConfig:
        values = (mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight,
                  smoothing_weight, consistency_weight)
        weights = tuple(_checks.real(f"{name}_weight", v) for name, v in zip(TERMS, values))
        return cls(weights, _checks.real("threshold", threshold), parse_groups(perceptual_groups))

    def weight(self, term: str) -> float:
        return self.weights[TERMS.index(term)]

    def settings(self) -> torch.Tensor:
        """The float64 [8] settings table the fused kernels read, on the CPU."""
        return torch.tensor(self.weights + (self.threshold,), dtype=torch.float64)

    def group_coef(self) -> torch.Tensor | None:
        if self.groups is None:
            return None
        size = max(max(indices) for indices, _ in self.groups) + 1
        coef = torch.zeros(size, dtype=torch.float64)
        for indices, weight in self.groups:
            for k in indices:
                coef[k] += weight / len(indices)
        return coef


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
        indices = tuple(_checks.integer(f"perceptual_groups[{i}] index", k) for k in indices)
        if min(indices) < 0:
            raise ValueError(f"perceptual_groups[{i}] indices must be >= 0, got {min(indices)}")
        parsed.append((indices, _checks.real(f"perceptual_groups[{i}] weight", weight)))
    return tuple(parsed)


def computed_terms(nonzero: tuple[bool, ...], pred_dim: int, has_raw: bool,
                   has_prev: bool) -> tuple[tuple[str, ...], int]:
    """The terms a call computes (weight non-zero and inputs present; temporal needs [B, T, K]),
    and their bit mask in TERMS order."""
    present = {"temporal": pred_dim == 3, "smoothing": has_raw, "consistency": has_prev}
    terms = tuple(t for t, used in zip(TERMS, nonzero) if used and present.get(t, True))
    return terms, term_mask(terms)


def term_mask(terms: Sequence[str]) -> int:
    return sum(1 << TERMS.index(t) for t in terms)


def check_inputs(config: BlendshapeConfig, pred, target, raw_pred, prev_pred, landmark_matrix,
                 nonzero: tuple[bool, ...] | None = None) -> None:
    """Validate one call's tensors against the configuration (metadata only, no sync). Reads only
    which weights are non-zero (``nonzero``), not their values."""
    nonzero = nonzero if nonzero is not None else tuple(w != 0 for w in config.weights)
    uses = dict(zip(TERMS, nonzero))
    _checks.tensor("pred", pred, shape_doc="[B, K] or [B, T, K]")
    if pred.dim() not in (2, 3):
        raise ValueError(f"pred must be [B, K] or [B, T, K], got shape {tuple(pred.shape)}")
    for name, value in (("target", target), ("raw_pred", raw_pred), ("prev_pred", prev_pred)):
        if value is None and name != "target":
            continue
        _checks.tensor(name, value, shape_doc="like pred")
        _checks.same_tensor_kind(name, value, "pred", pred)
        _checks.shape(name, value, pred.shape, "pred's shape")
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
        _checks.tensor("landmark_matrix", landmark_matrix, rank=2, shape_doc="[J, K]")
        if landmark_matrix.shape[1] != K or landmark_matrix.shape[0] < 1:
            raise ValueError(f"landmark_matrix must be [J, K] with K = {K}, got {tuple(landmark_matrix.shape)}")
        if landmark_matrix.device != pred.device:
            raise ValueError(f"landmark_matrix must be on pred's device {pred.device}, got {landmark_matrix.device}")


def landmark_gram(landmark_matrix: torch.Tensor) -> torch.Tensor:
    """M^T M in float64: sum_j ((e @ M^T)_j)^2 = e^T (M^T M) e. No gradient to M."""
    m = landmark_matrix.detach().to(torch.float64)
    return m.T @ m


# ---------------------------------------------------------------------------------------------
# Operator glue shared by the C++ (cpu, cuda) and Triton backends
# ---------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_col_stats(terms: int, group_coef) -> bool:
    """The default perceptual form needs full column statistics (its weights are squared)."""
    return bool(terms & (1 << TERMS.index("perceptual"))) and group_coef is None


def empty_outputs(pred, terms: int, group_coef):
    acc = acc_dtype(pred.dtype)
    columns = math.prod(pred.shape[1:]) if needs_col_stats(terms, group_coef) else 0
    return (pred.new_empty((bin(terms).count("1"),), dtype=acc), pred.new_empty((), dtype=acc),
            pred.new_empty((2, columns), dtype=acc))


def empty_gradients(pred, output_mask, has_raw: bool):
    return (
        pred.new_empty(pred.shape if output_mask[0] else (0,)),
        pred.new_empty(pred.shape if output_mask[1] else (0,)),
        pred.new_empty(pred.shape if output_mask[2] and has_raw else (0,)),
    )


def forward_fake(pred, target, raw_pred, prev_pred, settings, group_coef, landmark_gram, landmark_rows, terms):
    return empty_outputs(pred, terms, group_coef)


def backward_fake(grad_terms, grad_total, col_stats, pred, target, raw_pred, prev_pred, settings, group_coef,
                  landmark_gram, landmark_rows, terms, output_mask):
    return empty_gradients(pred, output_mask, raw_pred is not None)


# pred, target and raw_pred receive gradients; prev_pred (3) is a constant of the loss (no gradient).
GRAD_INPUTS = (0, 1, 2)


def register_cpp() -> None:
    """Fake implementations of the C++ operators ``fusedloss::blendshape_forward`` / ``blendshape_backward``
    (their autograd is registered in C++: csrc/autograd.h)."""
    torch.library.register_fake("fusedloss::blendshape_forward")(forward_fake)
    torch.library.register_fake("fusedloss::blendshape_backward")(backward_fake)


def register_triton(forward_op, backward_op):
    """Autograd of the Triton operators (ops/_autograd.py); returns their eager form."""
    return register_terms_autograd(forward_op, backward_op, GRAD_INPUTS, num_aux=1, constants=(3,))


def forward_op(backend: str, *, eager: bool = False):
    """The forward operator of a fused backend (autograd, fake tensors and compile included).
    ``eager``: for an eager call on real tensors (Triton: the same formula without the dispatcher,
    ops/_autograd.py)."""
    if backend == "triton":
        from ..triton import blendshape as triton_blendshape

        return triton_blendshape.blendshape_forward_eager if eager else triton_blendshape.blendshape_forward
    return torch.ops.fusedloss.blendshape_forward.default
