"""KoeMorph's training code (``atsuki-ichikawa/KoeMorph``, ``src/model/losses.py``), fused.

The repository's ``KoeMorphLoss`` differs from the KoeMorph loss that ``BlendshapeLoss`` follows::

    KoeMorphLoss(mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.2,
                 sparsity_weight=0.01, smoothness_weight=0.1, landmark_weight=0.3,
                 velocity_weight=0.05, reduction="mean", eps=1e-8)
    total, metrics = loss_fn(pred [B, 52], target [B, 52], prev_pred=None, prev_target=None,
                             audio_features=None)

with, for each term whose weight is > 0 (a weight <= 0 switches its term off; ``total`` is the
sum of the weighted terms):
  mse, l1      means over B x K of e^2 and |e| (the reduction of its ``mse_loss`` / ``l1_loss``
               modules, ``reduction``: "sum" gives sums)
  perceptual   sum over groups of weight_g * mean over B x |g| of e^2: mouth 12..31 (2.0),
               eye 0..11 (1.0), brow 32..43 (1.0), jaw 44..51 (1.5); plus, with ``audio_features``,
               0.5 * (1 - cosine of the batch's mouth activity and audio energy, each L2-normalised)
  temporal     with prev_pred and prev_target: mean of ((pred - prev_pred) - (target - prev_target))^2
  velocity     the same differences, mean absolute value
  sparsity     mean |pred|
  smoothness   mean |pred[:, k+1] - pred[:, k]| (neighbouring blendshapes, not time)
  landmark     mean over B x 136 of ((pred - target) @ M^T)^2 for the [136, 52] matrix M, the
               parameter ``landmark_loss.bs_to_landmark_weights`` (a random placeholder in the
               repository, drawn with ``torch.randn(136, 52) * 0.01`` when the loss is built)
``metrics`` holds each term unweighted as a Python float, plus mae, rmse, correlation,
precision/recall/f1_score (at 0.1) and range_ratio: one host sync per value, every step.

This module has the repository's surface: the eight weights, ``reduction`` and ``eps`` as
attributes that take effect at the next call, the submodules ``mse_loss``, ``l1_loss``,
``perceptual_loss`` (when perceptual_weight > 0) and ``landmark_loss`` (when landmark_weight > 0),
the same state dict (``landmark_loss.bs_to_landmark_weights``), so checkpoints load both ways,
and the same draw from the global random stream when it is built, so a run switched to it
consumes the same random numbers. ``landmark_seed=`` draws the matrix from a private generator
instead, and ``landmark_matrix=`` gives it. Here mse, l1, the group perceptual term and landmark
run in one fused kernel pair (``BlendshapeLoss``, held outside the module tree as ``fused``); the
small remaining terms are plain PyTorch. What differs on purpose: ``metrics="tensors"`` returns
the unweighted terms as 0-dim tensors and skips the extra statistics, so a step never syncs (the
default ``"floats"`` keeps the repository's form); a landmark weight made > 0 on a loss built
without ``landmark_loss`` raises (the repository silently skips the term); a perceptual weight
made > 0 adds ``perceptual_loss``. ``from_config(cfg.training.loss)`` builds the loss as the
repository's ``src/train.py`` does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..blendshape.module import BlendshapeLoss
from ..core import checks
from ..core.module import Backend

# KoeMorph's perceptual groups (index ranges of the 52 ARKit blendshapes) and their weights.
GROUPS = {"mouth": (range(12, 32), 2.0), "eye": (range(0, 12), 1.0), "brow": (range(32, 44), 1.0),
          "jaw": (range(44, 52), 1.5)}
LANDMARKS = 68
THRESHOLD = 0.1   # of its precision / recall metrics
# The weights in the constructor's order, and the terms the fused kernel computes.
WEIGHTS = ("mse", "l1", "perceptual", "temporal", "sparsity", "smoothness", "landmark", "velocity")
FUSED = ("mse", "l1", "perceptual", "landmark")


class PerceptualBlendshapeLoss(nn.Module):
    """The repository's ``perceptual_loss``: the group-weighted MSE (and audio-visual term) in
    plain PyTorch. ``KoeMorphLoss`` computes the group part fused; this module is its surface."""

    def __init__(self) -> None:
        super().__init__()
        self.mouth_group, self.eye_group = list(GROUPS["mouth"][0]), list(GROUPS["eye"][0])
        self.brow_group, self.jaw_group = list(GROUPS["brow"][0]), list(GROUPS["jaw"][0])
        self.groups = {"mouth": self.mouth_group, "eye": self.eye_group, "brow": self.brow_group,
                       "jaw": self.jaw_group}

    def forward(self, pred_blendshapes, target_blendshapes, audio_features=None):
        total = sum(GROUPS[name][1] * F.mse_loss(pred_blendshapes[:, idx], target_blendshapes[:, idx])
                    for name, idx in self.groups.items())
        if audio_features is not None:
            total = total + 0.5 * _audiovisual(pred_blendshapes, audio_features, self.mouth_group)
        return total


class LandmarkConsistencyLoss(nn.Module):
    """The repository's ``landmark_loss``: ``bs_to_landmark_weights`` [2 * num_landmarks, 52], a
    parameter that needs no gradient, drawn as the repository draws it (``torch.randn(...) * 0.01``
    from the global random stream) unless given."""

    def __init__(self, num_landmarks: int = LANDMARKS, bs_to_landmark_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks
        if bs_to_landmark_weights is None:
            bs_to_landmark_weights = torch.randn(num_landmarks * 2, 52) * 0.01
        self.bs_to_landmark_weights = nn.Parameter(bs_to_landmark_weights, requires_grad=False)

    def forward(self, pred_blendshapes, target_blendshapes):
        matrix = self.bs_to_landmark_weights
        pred = torch.matmul(pred_blendshapes, matrix.T).view(-1, self.num_landmarks, 2)
        target = torch.matmul(target_blendshapes, matrix.T).view(-1, self.num_landmarks, 2)
        return F.mse_loss(pred, target)


def _weight(term: str):
    """The attribute ``{term}_weight``: > 0 computes the term with that weight, <= 0 switches it off."""

    def get(self) -> float:
        return self.__dict__["_weights"][term]

    def set(self, value) -> None:
        value = checks.real(f"{term}_weight", value)
        if value > 0 and term == "landmark" and "landmark_loss" not in self._modules:
            raise ValueError("landmark_weight > 0 needs landmark_loss, which a KoeMorphLoss built with "
                             "landmark_weight <= 0 does not have (the repository's loss then skips the term): "
                             "assign landmark_matrix first, or build the loss with landmark_weight > 0")
        if value > 0 and term == "perceptual" and "perceptual_loss" not in self._modules:
            self.perceptual_loss = PerceptualBlendshapeLoss()
        self.__dict__["_weights"][term] = value
        if term in FUSED:
            self._sync_landmark()
            setattr(self.fused, f"{term}_weight", value if value > 0 else 0.0)

    return property(get, set, doc=f"Weight of the {term} term (<= 0: off); assignable between calls.")


class KoeMorphLoss(nn.Module):
    """The repository's ``KoeMorphLoss``, fused where it can be; see the module docstring."""

    def __init__(self, mse_weight: float = 1.0, l1_weight: float = 0.1, perceptual_weight: float = 0.5,
                 temporal_weight: float = 0.2, sparsity_weight: float = 0.01, smoothness_weight: float = 0.1,
                 landmark_weight: float = 0.3, velocity_weight: float = 0.05,
                 reduction: Literal["mean", "sum"] = "mean", eps: float = 1e-8, *,
                 landmark_matrix: torch.Tensor | None = None, landmark_seed: int | None = None,
                 metrics: Literal["floats", "tensors"] = "floats", backend: Backend = "auto") -> None:
        super().__init__()
        weights = dict(zip(WEIGHTS, (checks.real(f"{t}_weight", w) for t, w in zip(WEIGHTS, (
            mse_weight, l1_weight, perceptual_weight, temporal_weight, sparsity_weight, smoothness_weight,
            landmark_weight, velocity_weight)))))
        fused = BlendshapeLoss(mse_weight=0.0, l1_weight=0.0, perceptual_weight=0.0,
                               perceptual_groups=[(list(idx), w) for idx, w in GROUPS.values()], backend=backend)
        self.__dict__.update(fused=fused, _weights={t: 0.0 for t in WEIGHTS}, _landmark_seen=None, _groups_seen=None,
                             _landmark_seed=None if landmark_seed is None else checks.integer("landmark_seed",
                                                                                             landmark_seed))
        self.metrics, self.eps = metrics, eps
        # The repository's submodules, in its order (only landmark_loss draws random numbers).
        self.mse_loss, self.l1_loss = nn.MSELoss(), nn.L1Loss()
        self.reduction = reduction
        if weights["perceptual"] > 0:
            self.perceptual_loss = PerceptualBlendshapeLoss()
        if landmark_matrix is not None:
            self.landmark_matrix = landmark_matrix
        elif weights["landmark"] > 0 and landmark_seed is not None:
            generator = torch.Generator().manual_seed(self._landmark_seed)
            self.landmark_matrix = torch.randn(2 * LANDMARKS, 52, generator=generator) * 0.01
        elif weights["landmark"] > 0:
            self.landmark_loss = LandmarkConsistencyLoss()   # the repository's draw from the global stream
        for term, value in weights.items():
            setattr(self, f"{term}_weight", value)

    mse_weight, l1_weight, perceptual_weight = _weight("mse"), _weight("l1"), _weight("perceptual")
    temporal_weight, sparsity_weight, smoothness_weight = _weight("temporal"), _weight("sparsity"), _weight("smoothness")
    landmark_weight, velocity_weight = _weight("landmark"), _weight("velocity")

    @property
    def reduction(self) -> str:
        """"mean" or "sum": the reduction of ``mse_loss`` and ``l1_loss`` (the repository's mse and
        l1 terms; its other terms are means)."""
        return self.mse_loss.reduction

    @reduction.setter
    def reduction(self, value) -> None:
        checks.choice("reduction", value, ("mean", "sum"))
        self.mse_loss.reduction = self.l1_loss.reduction = value

    @property
    def metrics(self) -> str:
        """"floats" (the repository's metrics dict, synchronising) or "tensors" (the terms, no sync)."""
        return self.__dict__["_metrics"]

    @metrics.setter
    def metrics(self, value) -> None:
        self.__dict__["_metrics"] = checks.choice("metrics", value, ("floats", "tensors"))

    @property
    def landmark_matrix(self) -> torch.Tensor | None:
        """``landmark_loss.bs_to_landmark_weights`` (None without ``landmark_loss``). Assigning a
        [136, 52] tensor sets it (adding ``landmark_loss`` if needed); None removes ``landmark_loss``."""
        module = self._modules.get("landmark_loss")
        return None if module is None else module.bs_to_landmark_weights

    @landmark_matrix.setter
    def landmark_matrix(self, value) -> None:
        if value is None:
            if self.__dict__["_weights"]["landmark"] > 0:
                raise ValueError("landmark_matrix cannot be None while landmark_weight > 0")
            self._modules.pop("landmark_loss", None)
            return
        value = checks.tensor("landmark_matrix", torch.as_tensor(value), rank=2, shape_doc=f"[{2 * LANDMARKS}, 52]")
        checks.shape("landmark_matrix", value, (2 * LANDMARKS, 52), f"[2 * {LANDMARKS} landmarks, 52]")
        self.landmark_loss = LandmarkConsistencyLoss(LANDMARKS, value.detach().clone())
        self._sync_landmark()

    @property
    def landmark_seed(self) -> int | None:
        """The private seed the matrix was drawn with at construction (None: the global stream)."""
        return self.__dict__["_landmark_seed"]

    @landmark_seed.setter
    def landmark_seed(self, value) -> None:
        raise ValueError("landmark_seed chooses how the landmark matrix is drawn at construction; "
                         "assign landmark_matrix to change the matrix")

    @property
    def backend(self) -> str:
        return self.fused.backend

    @backend.setter
    def backend(self, value) -> None:
        self.fused.backend = value

    def _sync_landmark(self) -> None:
        """The fused module's landmark matrix is ``landmark_loss.bs_to_landmark_weights`` as it is
        now (assigned, loaded, edited in place, moved: compared by identity, version and storage)."""
        module = self._modules.get("landmark_loss")
        if module is None or torch.compiler.is_compiling():
            return
        matrix = module.bs_to_landmark_weights
        seen = self.__dict__["_landmark_seen"]
        if seen is None or seen[0] is not matrix or seen[1:] != (matrix._version, matrix.data_ptr()):
            self.fused.landmark_matrix = matrix.detach()
            self.__dict__["_landmark_seen"] = (matrix, matrix._version, matrix.data_ptr())

    def _sync_groups(self) -> None:
        """The fused group term follows ``perceptual_loss.groups`` as it is now (a group's index list
        edited in place or replaced: compared by value), each group with its repository weight."""
        module = self._modules.get("perceptual_loss")
        if module is None or torch.compiler.is_compiling():
            return
        groups = tuple((tuple(indices), GROUPS[name][1]) for name, indices in module.groups.items())
        if groups != self.__dict__["_groups_seen"]:
            self.fused.perceptual_groups = groups
            self.__dict__["_groups_seen"] = groups

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.fused._apply(fn, recurse)   # (held outside the module tree, so that the state dict is the repository's)
        return out

    def forward(self, pred_blendshapes: torch.Tensor, target_blendshapes: torch.Tensor, prev_pred=None,
                prev_target=None, audio_features=None):
        pred, target = pred_blendshapes, target_blendshapes
        w = self.__dict__["_weights"]
        self._sync_landmark()
        self._sync_groups()
        _, fused = self.fused(pred, target, return_components=True)
        terms = {}
        for name, criterion in (("mse", self.mse_loss), ("l1", self.l1_loss)):
            if w[name] > 0:
                terms[name] = fused[name] * pred.numel() if criterion.reduction == "sum" else fused[name]
        if w["perceptual"] > 0:
            terms["perceptual"] = fused["perceptual"]
            if audio_features is not None:
                terms["perceptual"] = terms["perceptual"] + 0.5 * _audiovisual(pred, audio_features,
                                                                               self.perceptual_loss.mouth_group)
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

    def extra_repr(self) -> str:
        weights = ", ".join(f"{t}_weight={w}" for t, w in self.__dict__["_weights"].items())
        return f"{weights}, reduction={self.reduction!r}, metrics={self.metrics!r}, backend={self.backend!r}"


def _audiovisual(pred, audio, mouth_group):
    mouth = pred[:, list(mouth_group)].mean(1)
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
