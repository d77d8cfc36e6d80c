"""``PVALoss``: Ditto's loss as a drop-in ``nn.Module`` holding its settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..core import checks
from ..core.module import FusedLoss, buffers_on, check_backend
from .config import PVAConfig
from .functional import pva_plan
from .layout import REG_WEIGHT, WEIGHT


class PVALoss(FusedLoss):
    """Ditto's per-part position / velocity / acceleration loss (docs/losses.md §1), fused.

    ``forward(pred [B, L, D], target [B, L, D], cond_frame [B, D] | None) -> (total, terms)``;
    ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to 0-dim tensors (Ditto's trainer sums them).
    Arguments as ``fusedloss.functional.pva_loss``. ``part_w_dict`` takes Ditto's form
    ``{name: [start, end, weight]}``; ``dim_ws`` may be a tensor or an array-like of D weights.

    The part table and ``dim_ws`` are (non-persistent) buffers: they follow ``.to(device)``, and a
    module left on the CPU moves them to the inputs' device on its first call.
    """

    _TABLES = ("part_table", "dim_ws")

    def __init__(
        self,
        part_w_dict: Mapping | None = None,
        use_last_frame_loss: bool = False,
        use_reg_loss: bool = False,
        dim_ws=None,
        loss_type: str = "l2",
        reg_weights: Mapping | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__(process_group)
        self.config = PVAConfig.build(part_w_dict, use_last_frame_loss, use_reg_loss, loss_type, reg_weights)
        self.backend = check_backend(backend)
        self.register_buffer("part_table", self.config.part_table(), persistent=False)
        if dim_ws is not None:
            dim_ws = torch.as_tensor(dim_ws).detach().to(torch.float64)
            if dim_ws.dim() != 1:
                raise ValueError(f"dim_ws must be [D], got shape {tuple(dim_ws.shape)}")
        self.register_buffer("dim_ws", dim_ws, persistent=False)

    def set_part_weight(self, part: str, weight: float | None = None, reg_weight: float | None = None) -> None:
        """Change a part's weight (or regularisation weight) in place: nothing is rebuilt or recompiled."""
        if part not in self.config.names:
            raise ValueError(f"part must be one of {list(self.config.names)}, got {part!r}")
        i = self.config.names.index(part)
        weights, regs = list(self.config.weights), list(self.config.reg_weights)
        if weight is not None:
            weights[i] = checks.real("weight", weight)
            self.part_table[i, WEIGHT] = weights[i]
        if reg_weight is not None:
            regs[i] = checks.real("reg_weight", reg_weight)
            self.part_table[i, REG_WEIGHT] = regs[i]
        self.config = dataclasses.replace(self.config, weights=tuple(weights), reg_weights=tuple(regs))
        self._plans.clear()

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, cond_frame: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key, run = self._cached(pred, target, cond_frame)
        if run is not None:
            return run(pred, target, cond_frame)
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor [B, L, D], got {type(pred).__name__}")
        table, dim_ws = buffers_on(self, ("part_table", "dim_ws"), pred.device)
        run = pva_plan(pred, target, cond_frame, self.config, part_table=table, dim_ws=dim_ws,
                       backend=self.backend, process_group=self.process_group)
        return self._remember(key, run)(pred, target, cond_frame)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"parts={list(c.names)}, loss_type={c.loss_type!r}, use_last_frame_loss={c.use_last_frame}, "
            f"use_reg_loss={c.use_reg}, backend={self.backend!r}"
        )
