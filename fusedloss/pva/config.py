"""PVA loss (Ditto): its configuration and the validation of a call's inputs (docs/losses.md §1).

``PVAConfig`` is the validated form of ``PVALoss``'s constructor arguments; ``part_table()`` is
the float64 table the fused kernels read (columns: ``layout.TABLE_COLUMNS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..core import checks
from .layout import STATS, TABLE_COLUMNS

LOSS_TYPES = ("l2", "l1")

# Ditto's default parts of its 265-dim motion vector: name -> (start, end, weight).
DITTO_PARTS: dict[str, tuple[int, int, float]] = {
    "scale": (0, 1, 1.0),
    "pitch": (1, 67, 1.0),
    "yaw": (67, 133, 1.0),
    "roll": (133, 199, 1.0),
    "t": (199, 202, 1.0),
    "exp": (202, 265, 1.0),
}


def default_reg_weight(part: str) -> float:
    """Ditto's regularisation weight: 0 for the part named "scale", 1e-4 for every other part."""
    return 0.0 if part == "scale" else 1e-4


@dataclass(frozen=True)
class PVAConfig:
    names: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]  # as given; start <= 0 means 0, end <= 0 means D
    weights: tuple[float, ...]
    reg_weights: tuple[float, ...]
    loss_type: str
    use_last_frame: bool
    use_reg: bool

    @classmethod
    def build(
        cls,
        part_w_dict: Mapping | None = None,
        use_last_frame_loss: bool = False,
        use_reg_loss: bool = False,
        loss_type: str = "l2",
        reg_weights: Mapping | None = None,
    ) -> PVAConfig:
        parts = DITTO_PARTS if part_w_dict is None else part_w_dict
        if not isinstance(parts, Mapping):
            raise TypeError(
                "part_w_dict must be a mapping {name: (start, end, weight)}, "
                f"got {type(parts).__name__}"
            )
        if not parts:
            raise ValueError("part_w_dict must hold at least one part")
        names, spans, weights = [], [], []
        for name, spec in parts.items():
            if not isinstance(name, str):
                raise TypeError(f"part_w_dict keys must be part names (str), got {name!r}")
            if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) != 3:
                raise ValueError(f"part_w_dict[{name!r}] must be (start, end, weight), got {spec!r}")
            start = checks.integer(f"part_w_dict[{name!r}] start", spec[0])
            end = checks.integer(f"part_w_dict[{name!r}] end", spec[1])
            names.append(name)
            spans.append((start, end))
            weights.append(checks.real(f"part_w_dict[{name!r}] weight", spec[2]))
        if reg_weights is not None and not isinstance(reg_weights, Mapping):
            raise TypeError(f"reg_weights must be a mapping {{part name: weight}}, got {type(reg_weights).__name__}")
        reg_weights = dict(reg_weights or {})
        unknown = sorted(set(reg_weights) - set(names))
        if unknown:
            raise ValueError(f"reg_weights names parts that part_w_dict does not have: {unknown}")
        regs = tuple(
            checks.real(f"reg_weights[{n!r}]", reg_weights[n]) if n in reg_weights else default_reg_weight(n)
            for n in names
        )
        return cls(
            names=tuple(names),
            spans=tuple(spans),
            weights=tuple(weights),
            reg_weights=regs,
            loss_type=checks.choice("loss_type", loss_type, LOSS_TYPES),
            use_last_frame=checks.flag("use_last_frame_loss", use_last_frame_loss),
            use_reg=checks.flag("use_reg_loss", use_reg_loss),
        )

    @property
    def stats(self) -> tuple[str, ...]:
        """Term letters of one part, in kernel order."""
        return STATS[:3] + (STATS[3:4] if self.use_last_frame else ()) + (STATS[4:] if self.use_reg else ())

    def term_names(self) -> tuple[str, ...]:
        return tuple(f"{name}_{stat}" for name in self.names for stat in self.stats)

    def resolved_spans(self, D: int) -> list[tuple[int, int]]:
        """Spans with Ditto's convention applied, checked to lie inside ``[0, D)``."""
        out = []
        for name, (start, end) in zip(self.names, self.spans):
            s, e = (start if start > 0 else 0), (end if end > 0 else D)
            if not (0 <= s < e <= D):
                raise ValueError(
                    f"part_w_dict[{name!r}] = ({start}, {end}) must satisfy 0 <= start < end <= D = {D} "
                    f"(start <= 0 means 0, end <= 0 means D); got [{s}, {e})"
                )
            out.append((s, e))
        return out

    def part_table(self) -> torch.Tensor:
        """The float64 ``[P, len(TABLE_COLUMNS)]`` table the fused kernels read, on the CPU."""
        rows = [
            dict(start=float(s), end=float(e), weight=w, reg_weight=r)
            for (s, e), w, r in zip(self.spans, self.weights, self.reg_weights)
        ]
        return torch.tensor([[row[c] for c in TABLE_COLUMNS] for row in rows], dtype=torch.float64)


def check_inputs(config: PVAConfig, pred, target, cond_frame, dim_ws) -> None:
    """Validate the tensors of one call against the configuration (metadata only, no sync)."""
    checks.tensor("pred", pred, rank=3, shape_doc="[B, L, D]")
    checks.tensor("target", target, shape_doc="[B, L, D]")
    checks.same_tensor_kind("target", target, "pred", pred)
    checks.shape("target", target, pred.shape, "pred's shape [B, L, D]")
    B, L, D = pred.shape
    if L < 1 or D < 1:
        raise ValueError(f"pred must have at least one frame and one dimension, got shape {tuple(pred.shape)}")
    config.resolved_spans(D)
    if config.use_last_frame:
        if cond_frame is None:
            raise ValueError("cond_frame [B, D] is required when use_last_frame_loss=True")
        checks.tensor("cond_frame", cond_frame, rank=2, shape_doc="[B, D]")
        checks.same_tensor_kind("cond_frame", cond_frame, "pred", pred)
        checks.shape("cond_frame", cond_frame, (B, D), "[B, D]")
    if dim_ws is not None:
        checks.tensor("dim_ws", dim_ws, rank=1, shape_doc="[D]")
        checks.shape("dim_ws", dim_ws, (D,), "[D]")
        if dim_ws.device != pred.device:
            raise ValueError(f"dim_ws must be on pred's device {pred.device}, got {dim_ws.device}")
