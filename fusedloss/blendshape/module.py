"""``BlendshapeLoss``: KoeMorph's loss as a drop-in ``nn.Module``.

A call's route: ``forward`` -> ``FusedLoss._plan`` (cached per module state and inputs' metadata,
core/module.py) -> ``functional.blendshape_plan`` (validation, backend choice) -> its ``run``,
which calls, per backend:
  reference   ``reference.blendshape_loss_reference`` (PyTorch autograd)
  cpu, cuda   the C++ operator ``torch.ops.fusedloss.blendshape_forward``; its autograd is registered
              in C++ (csrc/common/autograd.h), so an eager step runs no Python between the
              forward and the backward kernel
  triton      the Triton operator ``triton.blendshape_forward``, its autograd registered from
              core/autograd.py (the Python statement of the same formula); an eager call on
              real tensors takes that formula as an ``autograd.Function`` over the launchers
              (``triton.blendshape_forward_eager``), which skips the dispatcher's cost
  with ``process_group``: ``distributed.py``. The reference runs on statistics all_reduced with
              their gradient (``reference_over_group``); a fused backend calls
              ``fused_over_group``, an ``autograd.Function`` of the same formula (core/autograd.py)
              around the same operators: the forward's terms and column statistics all_reduced,
              the backward operator given scaled gradients and the whole batch's statistics (the
              default perceptual form's importance weights are column sums over every rank, so a
              rank's gradient needs them: the registered autograd, which keeps the rank's own,
              cannot be reused as it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.distributed import ProcessGroup

from ..core import checks
from ..core.module import Backend, ConfigValue, FusedLoss, table
from .config import BlendshapeConfig, parse_groups
from .functional import blendshape_plan
from .layout import SETTINGS, TERMS


def _weight(config: BlendshapeConfig, name: str) -> float:
    return config.threshold if name == "threshold" else config.weights[TERMS.index(name[: -len("_weight")])]


def _with_weight(config: BlendshapeConfig, name: str, value: float) -> BlendshapeConfig:
    if name == "threshold":
        return dataclasses.replace(config, threshold=value)
    weights = list(config.weights)
    weights[TERMS.index(name[: -len("_weight")])] = value
    return dataclasses.replace(config, weights=tuple(weights))


def _setting():
    """A weight or the threshold: a slot of the ``settings`` table (``layout.SETTINGS``)."""
    return ConfigValue(checks.real, _weight, _with_weight)


class BlendshapeLoss(FusedLoss):
    """KoeMorph's MSE + L1 + perceptual loss with the optional temporal, landmark, smoothing and
    consistency terms (docs/losses.md §2), fused.

    ``forward(pred, target, raw_pred=None, prev_pred=None, return_components=False)`` returns
    ``total``, or ``(total, terms)`` with the computed terms (unweighted) and "total". Arguments
    as ``fusedloss.functional.blendshape_loss``.

    Every constructor argument is an attribute that can be assigned between calls
    (docs/losses.md §0.6), e.g. ``loss_fn.temporal_weight = 0.3``: a weight going to or from 0
    adds or drops its term. The weights and the threshold live in the float64 ``settings`` table
    and the landmark matrix in ``landmark_matrix``, both in the state dict.
    """

    _TABLES = ("settings", "landmark_matrix")
    _CONFIG_TABLES = ("settings",)

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
        perceptual_groups: Sequence[tuple[Sequence[int], float]] | None = None,
        landmark_matrix: torch.Tensor | None = None,
        backend: Backend = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        config = BlendshapeConfig.build(mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight,
                                        smoothing_weight, consistency_weight, threshold, perceptual_groups)
        super().__init__(config, {"landmark_matrix": landmark_matrix}, backend, process_group)

    mse_weight = _setting()
    l1_weight = _setting()
    perceptual_weight = _setting()
    temporal_weight = _setting()
    landmark_weight = _setting()
    smoothing_weight = _setting()
    consistency_weight = _setting()
    threshold = _setting()

    perceptual_groups = ConfigValue(lambda name, value: parse_groups(value), lambda config, name: config.groups,
                                    lambda config, name, value: dataclasses.replace(config, groups=value))

    def forward(self, pred: torch.Tensor, target: torch.Tensor, raw_pred: torch.Tensor | None = None,
                prev_pred: torch.Tensor | None = None, return_components: bool = False):
        total, terms = self._plan(pred, target, raw_pred, prev_pred)(pred, target, raw_pred, prev_pred)
        if return_components is False:
            return total
        if not checks.flag("return_components", return_components):
            return total
        out = dict(terms)
        out["total"] = total
        return total, out

    def _make_plan(self, pred, target, raw_pred, prev_pred):
        device = pred.device if isinstance(pred, torch.Tensor) else None
        return blendshape_plan(pred, target, raw_pred, prev_pred, self._config_now(), settings=self.settings,
                               landmark_matrix=self._table_on("landmark_matrix", device), backend=self.backend,
                               process_group=self.process_group)

    # -- the tables (core/module.py) -----------------------------------------------------------

    def _table_values(self, name, config):
        return config.weights + (config.threshold,)

    def _config_with(self, name, values, config):
        values = [checks.real(f"{name}[{slot}]", number) for slot, number in zip(SETTINGS, values)]
        return dataclasses.replace(config, weights=tuple(values[:len(TERMS)]), threshold=values[len(TERMS)])

    def _check_table(self, name, value):
        if name == "settings":
            value = table(name, value, 1, f"[{len(SETTINGS)}]", self._device())
            checks.shape(name, value, (len(SETTINGS),), "[len(layout.SETTINGS)]")
            # (its numbers are checked by _config_with, which every assignment and load reads it through)
            return value
        if value is None:
            if self._config_now().weight("landmark") != 0:
                raise ValueError("landmark_matrix [J, K] is required while landmark_weight is non-zero "
                                 "(give one, or make landmark_weight 0 first)")
            return None
        value = table(name, value, 2, "[J, K]", self._device())
        if value.shape[0] < 1 or value.shape[1] < 1:
            raise ValueError(f"landmark_matrix must be [J, K] with J, K >= 1, got {tuple(value.shape)}")
        return value

    def _check_config(self, config):
        if config.weight("landmark") != 0 and self._buffers.get("landmark_matrix") is None:
            raise ValueError("landmark_matrix [J, K] is required when landmark_weight is non-zero")

    def extra_repr(self) -> str:
        c = self._config_now()
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(TERMS, c.weights) if w)
        groups = f", perceptual_groups={len(c.groups)} groups" if c.groups else ""
        return f"{weights}, threshold={c.threshold}{groups}, backend={self.backend!r}"
