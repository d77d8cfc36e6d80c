"""Functional entry points: validate -> choose the backend -> call its operator.

Each function takes the same arguments as its module's constructor, plus the tensors, and
``backend="auto" | "triton" | "cuda" | "cpu" | "reference"`` (see ``fusedloss.backends``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import backends
from .ops import pva as pva_ops
from .reference import pva_loss_reference

__all__ = ["pva_loss"]


def pva_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: torch.Tensor | None = None,
    part_w_dict: Mapping | None = None,
    use_last_frame_loss: bool = False,
    use_reg_loss: bool = False,
    dim_ws: torch.Tensor | None = None,
    loss_type: str = "l2",
    reg_weights: Mapping | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-part position / velocity / acceleration loss of Ditto (SPEC §1).

    Args:
        pred, target: ``[B, L, D]`` motion sequences (float32/64/16, bfloat16, any strides).
        cond_frame: ``[B, D]``, needed with ``use_last_frame_loss``.
        part_w_dict: ``{name: (start, end, weight)}``; default Ditto's six parts of D = 265.
            ``start <= 0`` means 0 and ``end <= 0`` means D. Parts may overlap or leave gaps.
        use_last_frame_loss: add ``{part}_L`` = err(pred[:, 0], cond_frame) per part.
        use_reg_loss: add ``{part}_R`` = reg_weight * mean |pred| per part.
        dim_ws: optional ``[D]`` per-dimension weights (a constant for the fused backends).
        loss_type: ``"l2"`` (squared error) or ``"l1"`` (absolute error).
        reg_weights: ``{part: weight}``; default 0 for "scale" and 1e-4 for other parts.
        backend: which implementation runs it.

    Returns:
        ``(total, terms)``: ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to differentiable 0-dim
        tensors (float32 for 16-bit inputs), and ``total`` is their sum. No host synchronisation.
    """
    config = pva_ops.PVAConfig.build(part_w_dict, use_last_frame_loss, use_reg_loss, loss_type, reg_weights)
    return pva_loss_from_config(pred, target, cond_frame, config, dim_ws=dim_ws, backend=backend)


def pva_loss_from_config(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: torch.Tensor | None,
    config: pva_ops.PVAConfig,
    *,
    part_table: torch.Tensor | None = None,
    dim_ws: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pva_loss`` for a validated configuration (``PVALoss`` keeps its part table on the device)."""
    pva_ops.check_inputs(config, pred, target, cond_frame, dim_ws)
    name = backends.resolve(backend, pred.device.type)
    if name == "reference":
        return pva_loss_reference(pred, target, cond_frame, config, dim_ws)
    if dim_ws is not None and dim_ws.requires_grad:
        raise ValueError(
            f"dim_ws requires grad, but the {name!r} backend treats dim_ws as a constant; "
            "detach it, or use backend='reference' to differentiate it"
        )
    if part_table is None:
        part_table = config.part_table()
    # The table is tiny: an asynchronous copy (from pageable memory, staged at once) never syncs.
    part_table = part_table.to(pred.device, non_blocking=True)
    if dim_ws is not None:
        dim_ws = dim_ws.to(torch.float64).contiguous()
    cond_frame = cond_frame if config.use_last_frame else None
    terms, total = pva_ops.forward_op(name)(
        pred, target, cond_frame, part_table, dim_ws,
        config.loss_type, config.use_last_frame, config.use_reg,
    )
    return total, dict(zip(config.term_names(), terms.unbind(0)))
