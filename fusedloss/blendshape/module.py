"""``BlendshapeLoss``: KoeMorph's loss as a drop-in ``nn.Module`` holding its settings."""

from __future__ import annotations

import dataclasses

import torch

from ..core import checks
from ..core.module import FusedLoss, Setting, buffers_on, check_backend
from .config import BlendshapeConfig, landmark_gram
from .functional import blendshape_plan
from .layout import SETTINGS, TERMS


class BlendshapeLoss(FusedLoss):
    """KoeMorph's MSE + L1 + perceptual loss with the optional temporal, landmark, smoothing and
    consistency terms (docs/losses.md §2), fused.

    ``forward(pred, target, raw_pred=None, prev_pred=None, return_components=False)`` returns
    ``total``, or ``(total, terms)`` with the computed terms (unweighted) and "total". Arguments
    as ``fusedloss.functional.blendshape_loss``.

    The weights and the threshold are attributes (``loss_fn.temporal_weight = 0.3``): assigning one
    updates a small settings buffer in place, so seed 001's stride and epoch schedules never
    rebuild or recompile anything (a weight going to or from 0 adds or drops its term). The
    buffers follow ``.to(device)``; a module left on the CPU moves them on its first call.
    """

    _TABLES = ("settings", "group_coef", "landmark_gram")

    def __init__(
        self,
        mse_weight: float = 1.0,
        l1_weight: float = 0.1,
        perceptual_weight: float = 0.5,
        temporal_weight: float = 0.0,
        landmark_weight: float = 0.0,
        smoothing_weight: float = 0.0,
        consistency_weight: float = 0.0,
        threshold: float = 0.1,
        perceptual_groups=None,
        landmark_matrix: torch.Tensor | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__(process_group)
        config = BlendshapeConfig.build(mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight,
                                        smoothing_weight, consistency_weight, threshold, perceptual_groups)
        self.backend = check_backend(backend)
        if landmark_matrix is not None:
            landmark_matrix = checks.tensor("landmark_matrix", torch.as_tensor(landmark_matrix), rank=2,
                                             shape_doc="[J, K]").detach()
        elif config.weight("landmark") != 0:
            raise ValueError("landmark_matrix [J, K] is required when landmark_weight is non-zero")
        self.register_buffer("settings", config.settings(), persistent=False)
        self.register_buffer("group_coef", config.group_coef(), persistent=False)
        self.register_buffer("landmark_matrix", landmark_matrix, persistent=False)
        self.register_buffer("landmark_gram", None if landmark_matrix is None else landmark_gram(landmark_matrix),
                             persistent=False)
        self._config = config
        self._nonzero = tuple(w != 0 for w in config.weights)

    # The settings (layout.SETTINGS, the slots of the settings buffer).
    mse_weight = Setting()
    l1_weight = Setting()
    perceptual_weight = Setting()
    temporal_weight = Setting()
    landmark_weight = Setting()
    smoothing_weight = Setting()
    consistency_weight = Setting()
    threshold = Setting()

    def _get_setting(self, name: str) -> float:
        config = self._config
        return config.threshold if name == "threshold" else config.weight(name[: -len("_weight")])

    def _set_setting(self, name: str, value: float) -> None:
        config = self._config
        if name == "threshold":
            config = dataclasses.replace(config, threshold=value)
        else:
            index = TERMS.index(name[: -len("_weight")])
            if index == TERMS.index("landmark") and value != 0 and self.landmark_matrix is None:
                raise ValueError("landmark_weight needs the landmark_matrix given at construction")
            weights = list(config.weights)
            weights[index] = value
            config = dataclasses.replace(config, weights=tuple(weights))
            self._nonzero = tuple(w != 0 for w in config.weights)
        self.settings[SETTINGS.index(name)] = value
        self._config = config
        self._plans.clear()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, raw_pred: torch.Tensor | None = None,
                prev_pred: torch.Tensor | None = None, return_components: bool = False):
        key, run = self._cached(pred, target, raw_pred, prev_pred)
        if run is not None:
            total, terms = run(pred, target, raw_pred, prev_pred)
            if return_components is False:
                return total
            return _with_total(total, terms, return_components)
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor [B, K] or [B, T, K], got {type(pred).__name__}")
        settings, group_coef, matrix, gram = buffers_on(
            self, ("settings", "group_coef", "landmark_matrix", "landmark_gram"), pred.device)
        run = blendshape_plan(
            pred, target, raw_pred, prev_pred, self._config, nonzero=self._nonzero, settings=settings,
            group_coef=group_coef, landmark_matrix=matrix, landmark_gram=gram, backend=self.backend,
            process_group=self.process_group,
        )
        total, terms = self._remember(key, run)(pred, target, raw_pred, prev_pred)
        return _with_total(total, terms, return_components)

    def extra_repr(self) -> str:
        c = self._config
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(TERMS, c.weights) if w)
        groups = f", perceptual_groups={len(c.groups)} groups" if c.groups else ""
        return f"{weights}, threshold={c.threshold}{groups}, backend={self.backend!r}"


def _with_total(total: torch.Tensor, terms, return_components):
    """``BlendshapeLoss``'s result: total, or (total, terms with "total") with return_components."""
    if not checks.flag("return_components", return_components):
        return total
    out = dict(terms)
    out["total"] = total
    return total, out
