"""``PVALoss``: Ditto's loss as a drop-in ``nn.Module``.

A call's route: ``forward`` -> ``FusedLoss._plan`` (cached per module state and inputs' metadata,
core/module.py) -> ``functional.pva_plan`` (validation, backend choice) -> its ``run``, which
calls, per backend:
  reference   ``reference.pva_loss_reference`` (PyTorch autograd)
  cpu, cuda   the C++ operator ``torch.ops.fusedloss.pva_forward``; its autograd is registered
              in C++ (csrc/common/autograd.h), so an eager step runs no Python between the
              forward and the backward kernel
  triton      the Triton operator ``triton.pva_forward``, its autograd registered from
              core/autograd.py (the Python statement of the same formula); an eager call on
              real tensors takes that formula as an ``autograd.Function`` over the launchers
              (``triton.pva_forward_eager``), which skips the dispatcher's cost
  with ``process_group``: the same operator, then ``core.distributed.global_means``: one
              all_reduce of the terms, whose backward only scales the gradient (W * B_r / B), so
              the operator's own autograd runs underneath.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from ..core import checks
from ..core.module import Backend, ConfigValue, FusedLoss, table
from .config import LOSS_TYPES, PVAConfig
from .functional import pva_plan
from .layout import END, REG_WEIGHT, START, TABLE_COLUMNS, WEIGHT


def _field(field: str, check):
    """An attribute that is the field ``field`` of the configuration."""
    return ConfigValue(check, lambda config, name: getattr(config, field),
                       lambda config, name, value: dataclasses.replace(config, **{field: value}))


class PVALoss(FusedLoss):
    """Ditto's per-part position / velocity / acceleration loss (docs/losses.md §1), fused.

    ``forward(pred [B, L, D], target [B, L, D], cond_frame [B, D] | None) -> (total, terms)``;
    ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to 0-dim tensors (Ditto's trainer sums them).
    Arguments as ``fusedloss.functional.pva_loss``. ``part_w_dict`` takes Ditto's form
    ``{name: [start, end, weight]}``; ``dim_ws`` may be a tensor or an array-like of D weights.

    Every constructor argument is an attribute that can be assigned between calls
    (docs/losses.md §0.6); ``set_part_weight`` changes one part's weights. The parts' spans and
    weights live in the float64 ``part_table`` and the per-dimension weights in ``dim_ws``,
    both in the state dict.
    """

    _TABLES = ("part_table", "dim_ws")
    _CONFIG_TABLES = ("part_table",)

    def __init__(
        self,
        part_w_dict: Mapping[str, tuple[int, int, float]] | None = None,
        use_last_frame_loss: bool = False,
        use_reg_loss: bool = False,
        dim_ws: torch.Tensor | None = None,
        loss_type: Literal["l2", "l1"] = "l2",
        reg_weights: Mapping[str, float] | None = None,
        backend: Backend = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        config = PVAConfig.build(part_w_dict, use_last_frame_loss, use_reg_loss, loss_type, reg_weights)
        super().__init__(config, {"dim_ws": dim_ws}, backend, process_group)

    use_last_frame_loss = _field("use_last_frame", checks.flag)
    use_reg_loss = _field("use_reg", checks.flag)
    loss_type = _field("loss_type", lambda name, value: checks.choice(name, value, LOSS_TYPES))

    @property
    def part_w_dict(self) -> Mapping[str, tuple[int, int, float]]:
        """``{name: (start, end, weight)}`` (read-only; assign a new mapping to change the parts).
        The regularisation weights of parts that keep their name carry over."""
        c = self._config_now()
        return MappingProxyType({n: (s, e, w) for n, (s, e), w in zip(c.names, c.spans, c.weights)})

    @part_w_dict.setter
    def part_w_dict(self, value) -> None:
        c = self._config_now()
        names = PVAConfig.build(value).names
        kept = {n: r for n, r in zip(c.names, c.reg_weights) if n in names}
        self._set_config(PVAConfig.build(value, c.use_last_frame, c.use_reg, c.loss_type, kept))

    @property
    def reg_weights(self) -> Mapping[str, float]:
        """``{part: regularisation weight}`` of every part (read-only; assign a mapping to change
        them: parts it does not name get the default, 0 for "scale" and 1e-4 otherwise)."""
        c = self._config_now()
        return MappingProxyType(dict(zip(c.names, c.reg_weights)))

    @reg_weights.setter
    def reg_weights(self, value) -> None:
        c = self._config_now()
        parts = {n: (s, e, w) for n, (s, e), w in zip(c.names, c.spans, c.weights)}
        self._set_config(PVAConfig.build(parts, c.use_last_frame, c.use_reg, c.loss_type, value))

    def set_part_weight(self, part: str, weight: float | None = None, reg_weight: float | None = None) -> None:
        """Change a part's weight (or regularisation weight): nothing is rebuilt or recompiled."""
        c = self._config_now()
        if part not in c.names:
            raise ValueError(f"part must be one of {list(c.names)}, got {part!r}")
        i = c.names.index(part)
        weights, regs = list(c.weights), list(c.reg_weights)
        if weight is not None:
            weights[i] = checks.real("weight", weight)
        if reg_weight is not None:
            regs[i] = checks.real("reg_weight", reg_weight)
        self._set_config(dataclasses.replace(c, weights=tuple(weights), reg_weights=tuple(regs)))

    def forward(self, pred: torch.Tensor, target: torch.Tensor,
                cond_frame: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._plan(pred, target, cond_frame)(pred, target, cond_frame)

    def _make_plan(self, pred, target, cond_frame):
        device = pred.device if isinstance(pred, torch.Tensor) else None
        return pva_plan(pred, target, cond_frame, self._config_now(), part_table=self.part_table,
                        dim_ws=self._table_on("dim_ws", device), backend=self.backend,
                        process_group=self.process_group)

    # -- the tables (core/module.py) -----------------------------------------------------------

    def _table_values(self, name, config):
        return tuple(tuple(dict(start=float(s), end=float(e), weight=w, reg_weight=r)[column]
                           for column in TABLE_COLUMNS)
                     for (s, e), w, r in zip(config.spans, config.weights, config.reg_weights))

    def _config_with(self, name, values, config):
        spans, weights, regs = [], [], []
        for part, row in zip(config.names, values):
            start, end = row[START], row[END]
            if not (math.isfinite(start) and math.isfinite(end) and start == int(start) and end == int(end)):
                raise ValueError(f"part_table: part {part!r} has a start or end that is not an integer: "
                                 f"({start}, {end})")
            spans.append((int(start), int(end)))
            weights.append(checks.real(f"part_table[{part!r}] weight", row[WEIGHT]))
            regs.append(checks.real(f"part_table[{part!r}] reg_weight", row[REG_WEIGHT]))
        return dataclasses.replace(config, spans=tuple(spans), weights=tuple(weights), reg_weights=tuple(regs))

    def _check_table(self, name, value):
        if name == "part_table":
            value = table(name, value, 2, "[P, len(layout.TABLE_COLUMNS)]", self._device())
            checks.shape(name, value, (len(self._config_now().names), len(TABLE_COLUMNS)),
                         "[number of parts, len(layout.TABLE_COLUMNS)]")
            return value
        return None if value is None else table(name, value, 1, "[D]", self._device())

    def extra_repr(self) -> str:
        c = self._config_now()
        return (f"parts={list(c.names)}, loss_type={c.loss_type!r}, use_last_frame_loss={c.use_last_frame}, "
                f"use_reg_loss={c.use_reg}, backend={self.backend!r}")
