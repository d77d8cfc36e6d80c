"""KoeMorph's training code (``atsuki-ichikawa/KoeMorph``, ``src/model/losses.py``), fused.

The repository's ``KoeMorphLoss`` differs from the seed document that ``BlendshapeLoss`` follows::

    KoeMorphLoss(mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.2,
                 sparsity_weight=0.01, smoothness_weight=0.1, landmark_weight=0.3,
                 velocity_weight=0.05, reduction="mean", eps=1e-8)
    total, metrics = loss_fn(pred [B, 52], target [B, 52], prev_pred=None, prev_target=None,
                             audio_features=None)

with, for each term whose weight is > 0 (``total`` is the sum of the weighted terms):
  mse, l1      means over B x K of e^2 and |e| (``reduction="sum"``: sums)
  perceptual   sum over groups of weight_g * mean over B x |g| of e^2: mouth 12..31 (2.0),
               eye 0..11 (1.0), brow 32..43 (1.0), jaw 44..51 (1.5); plus, with ``audio_features``,
               0.5 * (1 - cosine of the batch's mouth activity and audio energy, each L2-normalised)
  temporal     with prev_pred and prev_target: mean of ((pred - prev_pred) - (target - prev_target))^2
  velocity     the same differences, mean absolute value
  sparsity     mean |pred|
  smoothness   mean |pred[:, k+1] - pred[:, k]| (neighbouring blendshapes, not time)
  landmark     mean over B x 136 of ((pred - target) @ M^T)^2 for its [136, 52] matrix M (in the
               repository a random placeholder ``landmark_loss.bs_to_landmark_weights``)
``metrics`` holds each term unweighted as a Python float, plus mae, rmse, correlation,
precision/recall/f1_score (at 0.1) and range_ratio: one host sync per value, every step.

Here mse, l1, the group perceptual term and landmark run in one fused kernel pair
(``BlendshapeLoss`` with these groups and the matrix); the small remaining terms are plain
PyTorch. What differs on purpose: ``metrics="tensors"`` returns the unweighted terms as 0-dim
tensors and skips the extra statistics, so a step never syncs (the default ``"floats"`` keeps the
repository's form). The matrix is a buffer (``landmark_matrix``; pass the repository's to
reproduce its numbers, else a seeded random one). ``from_config(cfg.training.loss)`` builds the
loss as the repository's ``src/train.py`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blendshape.module import BlendshapeLoss

# KoeMorph's perceptual groups (index ranges of the 52 ARKit blendshapes) and their weights.
GROUPS = {"mouth": (range(12, 32), 2.0), "eye": (range(0, 12), 1.0), "brow": (range(32, 44), 1.0),
          "jaw": (range(44, 52), 1.5)}
LANDMARKS = 68
THRESHOLD = 0.1   # of its precision / recall metrics


class KoeMorphLoss(nn.Module):
    """The repository's ``KoeMorphLoss``, fused where it can be; see the module docstring."""

    def __init__(self, mse_weight: float = 1.0, l1_weight: float = 0.1, perceptual_weight: float = 0.5,
                 temporal_weight: float = 0.2, sparsity_weight: float = 0.01, smoothness_weight: float = 0.1,
                 landmark_weight: float = 0.3, velocity_weight: float = 0.05, reduction: str = "mean",
                 eps: float = 1e-8, *, landmark_matrix: torch.Tensor | None = None, metrics: str = "floats",
                 backend: str = "auto") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if metrics not in ("floats", "tensors"):
            raise ValueError(f"metrics must be 'floats' or 'tensors', got {metrics!r}")
        self.weights = {"mse": mse_weight, "l1": l1_weight, "perceptual": perceptual_weight,
                        "temporal": temporal_weight, "velocity": velocity_weight, "sparsity": sparsity_weight,
                        "smoothness": smoothness_weight, "landmark": landmark_weight}
        self.reduction, self.eps, self.metrics = reduction, eps, metrics
        if landmark_matrix is None:
            landmark_matrix = torch.randn(2 * LANDMARKS, 52, generator=torch.Generator().manual_seed(0)) * 0.01
        # The fused part: mse, l1 (means; "sum" rescales them), group perceptual, landmark.
        self.fused = BlendshapeLoss(mse_weight=mse_weight, l1_weight=l1_weight,
                                    perceptual_weight=perceptual_weight, landmark_weight=landmark_weight,
                                    perceptual_groups=[(list(idx), w) for idx, w in GROUPS.values()],
                                    landmark_matrix=landmark_matrix if landmark_weight > 0 else None, backend=backend)

    def forward(self, pred_blendshapes: torch.Tensor, target_blendshapes: torch.Tensor, prev_pred=None,
                prev_target=None, audio_features=None):
        pred, target = pred_blendshapes, target_blendshapes
        w = self.weights
        _, fused = self.fused(pred, target, return_components=True)
        terms = {}
        elements = pred.numel() if self.reduction == "sum" else 1
        for name in ("mse", "l1"):
            if w[name] > 0:
                terms[name] = fused[name] * elements
        if w["perceptual"] > 0:
            terms["perceptual"] = fused["perceptual"]
            if audio_features is not None:
                terms["perceptual"] = terms["perceptual"] + 0.5 * _audiovisual(pred, audio_features)
        if w["temporal"] > 0 and prev_pred is not None and prev_target is not None:
            terms["temporal"] = F.mse_loss(pred - prev_pred, target - prev_target)
        if w["velocity"] > 0 and prev_pred is not None and prev_target is not None:
            terms["velocity"] = F.l1_loss(pred - prev_pred, target - prev_target)
        if w["sparsity"] > 0:
            terms["sparsity"] = pred.abs().mean()
        if w["smoothness"] > 0:
            terms["smoothness"] = torch.diff(pred, dim=1).abs().mean()
        if w["landmark"] > 0:
            terms["landmark"] = fused["landmark"]
        total = sum((w[name] * value for name, value in terms.items()), pred.new_zeros(()))
        if self.metrics == "tensors":
            return total, terms
        out = {name: value.item() for name, value in terms.items()}
        out.update(_statistics(pred, target, self.eps))
        return total, out


def _audiovisual(pred, audio):
    mouth = pred[:, list(GROUPS["mouth"][0])].mean(1)
    energy = audio.norm(dim=2).mean(1) if audio.dim() == 3 else audio.norm(dim=1)
    mouth, energy = F.normalize(mouth.unsqueeze(0), dim=1), F.normalize(energy.unsqueeze(0), dim=1)
    return 1 - F.cosine_similarity(mouth, energy).mean()


@torch.no_grad()
def _statistics(pred, target, eps):
    """The repository's extra metrics (floats)."""
    pred, target = pred.float(), target.float()
    correlations = [torch.corrcoef(torch.stack([p, t]))[0, 1] for p, t in zip(pred.flatten(1), target.flatten(1))]
    correlations = [c for c in correlations if not torch.isnan(c)]
    active_pred, active_target = (pred > THRESHOLD).float(), (target > THRESHOLD).float()
    tp = (active_pred * active_target).sum()
    fp = (active_pred * (1 - active_target)).sum()
    fn = ((1 - active_pred) * active_target).sum()
    precision, recall = tp / (tp + fp + eps), tp / (tp + fn + eps)
    return {"mae": F.l1_loss(pred, target).item(), "rmse": F.mse_loss(pred, target).sqrt().item(),
            "correlation": torch.stack(correlations).mean().item() if correlations else 0.0,
            "precision": precision.item(), "recall": recall.item(),
            "f1_score": (2 * precision * recall / (precision + recall + eps)).item(),
            "range_ratio": ((pred.max() - pred.min()) / (target.max() - target.min() + eps)).item()}


def from_config(loss_config, **kwargs) -> KoeMorphLoss:
    """``KoeMorphLoss`` from the repository's ``cfg.training.loss`` (mse, l1 and perceptual weights
    required; temporal, sparsity and smoothness optional), as its ``src/train.py`` builds it."""
    get = loss_config.get
    return KoeMorphLoss(mse_weight=loss_config["mse_weight"], l1_weight=loss_config["l1_weight"],
                        perceptual_weight=loss_config["perceptual_weight"],
                        temporal_weight=get("temporal_weight", 0.2), sparsity_weight=get("sparsity_weight", 0.01),
                        smoothness_weight=get("smoothness_weight", 0.1), **kwargs)
