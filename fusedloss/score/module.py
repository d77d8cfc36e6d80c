"""``CombinedLoss`` and ``AllPairsMarginRankingLoss``: TIGAS's losses as drop-in ``nn.Module``s.

A call's route: ``forward`` -> ``FusedLoss._plan`` (cached per module state and inputs' metadata,
core/module.py) -> ``functional.score_plan`` (validation, backend choice) -> its ``run``, which
calls, per backend:
  reference   ``reference.score_loss_reference`` / ``all_pairs_margin_ranking_reference``
  cpu, cuda   the C++ operator ``torch.ops.fusedloss.score_forward``; its autograd is registered
              in C++ (csrc/common/autograd.h), so an eager step runs no Python between the
              forward and the backward kernel
  triton      the Triton operator ``triton.score_forward``, its autograd registered from
              core/autograd.py (the Python statement of the same formula); an eager call on
              real tensors takes that formula as an ``autograd.Function`` over the launchers
              (``triton.score_forward_eager``), which skips the dispatcher's cost
  with ``process_group``: ``core.distributed.gather_batch`` gathers the O(B) inputs of every
              rank (this rank's rows keep their history, their gradient times W), then the same
              operator, with its own autograd, on the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from ..core import checks
from ..core.module import Backend, ConfigValue, FusedLoss, table
from .config import REDUCTIONS, REGRESSION_TYPES, ScoreConfig
from .functional import score_plan
from .layout import RANKING_ONLY, SETTINGS, TERMS


def _setting():
    """A weight or the margin: a slot of the ``settings`` table (``layout.SETTINGS``)."""
    def get(config, name):
        return config.margin if name == "margin" else config.weights[SETTINGS.index(name)]

    def replace(config, name, value):
        if name == "margin":
            return dataclasses.replace(config, margin=value)
        weights = list(config.weights)
        weights[SETTINGS.index(name)] = value
        return dataclasses.replace(config, weights=tuple(weights))

    return ConfigValue(checks.real, get, replace)


def _choice(field: str, options):
    return ConfigValue(lambda name, value: checks.choice(name, value, options),
                       lambda config, name: getattr(config, field),
                       lambda config, name, value: dataclasses.replace(config, **{field: value}))


class _ScoreLoss(FusedLoss):
    """What the two score modules share: the ``settings`` table (weights, margin)."""

    _TABLES = ("settings",)
    _CONFIG_TABLES = ("settings",)

    def _table_values(self, name, config):
        return config.weights + (config.margin,)

    def _config_with(self, name, values, config):
        values = [checks.real(f"{name}[{slot}]", number) for slot, number in zip(SETTINGS, values)]
        return dataclasses.replace(config, weights=tuple(values[:len(TERMS)]), margin=values[len(TERMS)])

    def _check_table(self, name, value):
        value = table(name, value, 1, f"[{len(SETTINGS)}]", self._device())
        checks.shape(name, value, (len(SETTINGS),), "[len(layout.SETTINGS)]")
        # (its numbers are checked by _config_with, which every assignment and load reads it through)
        return value


class CombinedLoss(_ScoreLoss):
    """TIGAS's regression + classification + all-pairs margin ranking loss (docs/losses.md §3), fused.

    ``forward(scores [B] | [B, 1], logits [B, 2], labels [B] | [B, 1]) -> (total, terms)`` with
    ``terms`` = {"regression", "classification", "ranking", "total"}: 0-dim tensors. Arguments as
    ``fusedloss.functional.combined_loss``. The ranking term uses every (real, fake) pair of the
    batch, exactly, in O(B log B): a million scores need no |R| x |F| matrix.

    Every constructor argument is an attribute that can be assigned between calls
    (docs/losses.md §0.6), e.g. ``loss_fn.ranking_weight = 0.5``. The weights and the margin live
    in the float64 ``settings`` table, in the state dict.
    """

    def __init__(
        self,
        regression_weight: float = 1.0,
        classification_weight: float = 0.3,
        ranking_weight: float = 0.2,
        regression_type: Literal["mse", "smoothl1"] = "mse",
        margin: float = 0.5,
        check_finite: bool = True,
        backend: Backend = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        config = ScoreConfig.build(regression_weight, classification_weight, ranking_weight, regression_type, margin)
        super().__init__(config, {}, backend, process_group)
        self.check_finite = check_finite

    regression_weight = _setting()
    classification_weight = _setting()
    ranking_weight = _setting()
    margin = _setting()
    regression_type = _choice("regression_type", REGRESSION_TYPES)

    @property
    def check_finite(self) -> bool:
        """Raise on a NaN/Inf in scores, logits or the total (one host sync per call)."""
        return self.__dict__["_check_finite"]

    @check_finite.setter
    def check_finite(self, value) -> None:
        self.__dict__["_check_finite"] = checks.flag("check_finite", value)

    def forward(self, scores: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._plan(scores, logits, labels)(scores, logits, labels)

    def _make_plan(self, scores, logits, labels):
        return score_plan(scores, logits, labels, self._config_now(), settings=self.settings,
                          check_finite=self.check_finite, backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        c = self._config_now()
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(TERMS, c.weights))
        return (f"{weights}, regression_type={c.regression_type!r}, margin={c.margin}, "
                f"check_finite={self.check_finite}, backend={self.backend!r}")


class AllPairsMarginRankingLoss(_ScoreLoss):
    """``max(0, margin - (s_i - s_j))`` over every pair of a real score s_i (label > 0.5) and a
    fake score s_j, averaged over the pairs (``"mean"``) or summed (``"sum"``): docs/losses.md §3's ranking
    term alone, exact in O(B log B) time and O(B) memory.

    ``forward(scores [B] | [B, 1], labels [B] | [B, 1]) -> 0-dim tensor``. ``margin`` and
    ``reduction`` can be assigned between calls; the margin lives in the ``settings`` table.
    """

    def __init__(self, margin: float = 0.5, reduction: Literal["mean", "sum"] = "mean", backend: Backend = "auto",
                 process_group: ProcessGroup | None = None) -> None:
        super().__init__(ScoreConfig.build(margin=margin, reduction=reduction), {}, backend, process_group)

    margin = _setting()
    reduction = _choice("reduction", REDUCTIONS)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._plan(scores, labels)(scores, None, labels)[0]

    def _make_plan(self, scores, labels):
        return score_plan(scores, None, labels, self._config_now(), settings=self.settings, term_mask=RANKING_ONLY,
                          backend=self.backend, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}"
