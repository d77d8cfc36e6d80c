"""``CombinedLoss`` and ``AllPairsMarginRankingLoss``: TIGAS's losses as drop-in ``nn.Module``s."""

from __future__ import annotations

import dataclasses

import torch

from ..core import checks
from ..core.module import FusedLoss, Setting, buffers_on, check_backend
from .config import ScoreConfig
from .functional import score_plan
from .layout import MARGIN, RANKING_ONLY, SETTINGS, TERMS


class CombinedLoss(FusedLoss):
    """TIGAS's regression + classification + all-pairs margin ranking loss (docs/losses.md §3), fused.

    ``forward(scores [B] | [B, 1], logits [B, 2], labels [B] | [B, 1]) -> (total, terms)`` with
    ``terms`` = {"regression", "classification", "ranking", "total"}: 0-dim tensors. Arguments as
    ``fusedloss.functional.combined_loss``. The ranking term uses every (real, fake) pair of the
    batch, exactly, in O(B log B): a million scores need no |R| x |F| matrix.

    The weights and the margin are attributes (``loss_fn.ranking_weight = 0.5``): assigning one
    updates a small settings buffer in place, so nothing is rebuilt or recompiled.
    """

    _TABLES = ("settings",)

    def __init__(
        self,
        regression_weight: float = 1.0,
        classification_weight: float = 0.3,
        ranking_weight: float = 0.2,
        regression_type: str = "mse",
        margin: float = 0.5,
        check_finite: bool = True,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__(process_group)
        config = ScoreConfig.build(regression_weight, classification_weight, ranking_weight,
                                             regression_type, margin)
        self.check_finite = check_finite
        self.backend = check_backend(backend)
        self.register_buffer("settings", config.settings(), persistent=False)
        self._config = config

    @property
    def regression_type(self) -> str:
        return self._config.regression_type

    # The settings (layout.SETTINGS, the slots of the settings buffer).
    regression_weight = Setting()
    classification_weight = Setting()
    ranking_weight = Setting()
    margin = Setting()

    def _get_setting(self, name: str) -> float:
        config = self._config
        return config.margin if name == "margin" else config.weights[SETTINGS.index(name)]

    def _set_setting(self, name: str, value: float) -> None:
        config = self._config
        if name == "margin":
            config = dataclasses.replace(config, margin=value)
        else:
            weights = list(config.weights)
            weights[SETTINGS.index(name)] = value
            config = dataclasses.replace(config, weights=tuple(weights))
        self.settings[SETTINGS.index(name)] = value
        self._config = config
        self._plans.clear()

    @property
    def check_finite(self) -> bool:
        """Raise on a NaN/Inf in scores, logits or the total (one host sync per call)."""
        return self._check_finite

    @check_finite.setter
    def check_finite(self, value) -> None:
        self._check_finite = checks.flag("check_finite", value)
        self._plans.clear()

    def forward(self, scores: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key, run = self._cached(scores, logits, labels)
        if run is not None:
            return run(scores, logits, labels)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor [B] or [B, 1], got {type(scores).__name__}")
        (settings,) = buffers_on(self, ("settings",), scores.device)
        run = score_plan(scores, logits, labels, self._config, settings=settings,
                         check_finite=self.check_finite, backend=self.backend, process_group=self.process_group)
        return self._remember(key, run)(scores, logits, labels)

    def extra_repr(self) -> str:
        c = self._config
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(TERMS, c.weights))
        return (f"{weights}, regression_type={c.regression_type!r}, margin={c.margin}, "
                f"check_finite={self.check_finite}, backend={self.backend!r}")


class AllPairsMarginRankingLoss(FusedLoss):
    """``max(0, margin - (s_i - s_j))`` over every pair of a real score s_i (label > 0.5) and a
    fake score s_j, averaged over the pairs (``"mean"``) or summed (``"sum"``): docs/losses.md §3's ranking
    term alone, exact in O(B log B) time and O(B) memory.

    ``forward(scores [B] | [B, 1], labels [B] | [B, 1]) -> 0-dim tensor``.
    """

    _TABLES = ("settings",)

    def __init__(self, margin: float = 0.5, reduction: str = "mean", backend: str = "auto",
                 process_group=None) -> None:
        super().__init__(process_group)
        self._config = ScoreConfig.build(margin=margin, reduction=reduction)
        self.backend = check_backend(backend)
        self.register_buffer("settings", self._config.settings(), persistent=False)

    margin = Setting()  # the settings buffer's MARGIN slot

    def _get_setting(self, name: str) -> float:
        return self._config.margin

    def _set_setting(self, name: str, value: float) -> None:
        self.settings[MARGIN] = value
        self._config = dataclasses.replace(self._config, margin=value)
        self._plans.clear()

    @property
    def reduction(self) -> str:
        return self._config.reduction

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        key, run = self._cached(scores, labels)
        if run is not None:
            return run(scores, None, labels)[0]
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor [B] or [B, 1], got {type(scores).__name__}")
        (settings,) = buffers_on(self, ("settings",), scores.device)
        run = score_plan(scores, None, labels, self._config, settings=settings,
                         term_mask=RANKING_ONLY, backend=self.backend, process_group=self.process_group)
        return self._remember(key, run)(scores, None, labels)[0]

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}"
