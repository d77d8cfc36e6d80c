"""The PVA loss's functional form: validate -> choose the backend -> call its operator.

``pva_plan`` is the whole route of a call (``PVALoss`` caches it per input signature): it checks
the inputs, resolves the backend, and returns ``run``, which calls
  reference   ``reference.pva_loss_reference`` (PyTorch's autograd)
  cpu, cuda   ``torch.ops.fusedloss.pva_forward`` (C++; its autograd is C++ too, csrc/common/autograd.h)
  triton      this family's Triton operator ``triton.pva_forward`` (its autograd: core/autograd.py),
              eagerly as the ``autograd.Function`` ``pva_forward_eager``
  then, over a process group, one all_reduce of the terms (core/distributed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .. import backends
from ..core import distributed
from ..core.autograd import is_eager
from ..core.terms import terms_maker
from .config import PVAConfig, check_inputs
from .reference import pva_loss_reference


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
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-part position / velocity / acceleration loss of Ditto (docs/losses.md §1).

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
        process_group: a ``torch.distributed`` group whose ranks each pass a slice of the batch:
            every rank gets the loss of the whole batch (docs/losses.md §5). None: this batch.

    Returns:
        ``(total, terms)``: ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to differentiable 0-dim
        tensors (float32 for 16-bit inputs), and ``total`` is their sum. No host synchronisation.
    """
    config = PVAConfig.build(part_w_dict, use_last_frame_loss, use_reg_loss, loss_type, reg_weights)
    return pva_loss_from_config(pred, target, cond_frame, config, dim_ws=dim_ws, backend=backend,
                                process_group=process_group)


def pva_loss_from_config(
    pred: torch.Tensor,
    target: torch.Tensor,
    cond_frame: torch.Tensor | None,
    config: PVAConfig,
    *,
    part_table: torch.Tensor | None = None,
    dim_ws: torch.Tensor | None = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``pva_loss`` for a validated configuration (``PVALoss`` keeps its part table on the device)."""
    run = pva_plan(pred, target, cond_frame, config, part_table=part_table, dim_ws=dim_ws, backend=backend,
                   process_group=process_group)
    return run(pred, target, cond_frame)


def operator(backend: str, eager: bool = False):
    """The forward operator of a fused backend: the C++ one (cpu, cuda) or this family's Triton one;
    ``eager``: for an eager call on real tensors (Triton: the same autograd formula as an
    ``autograd.Function`` calling the launchers, core/autograd.py)."""
    if backend == "triton":
        from . import triton

        return triton.pva_forward_eager if eager else triton.pva_forward
    return torch.ops.fusedloss.pva_forward.default


def pva_plan(pred, target, cond_frame, config: PVAConfig, *, part_table=None, dim_ws=None,
             backend: str = "auto", process_group=None) -> Callable:
    """Validate one call's metadata (types, shapes, dtypes, devices) and choose the backend; returns
    ``run(pred, target, cond_frame) -> (total, terms)`` for every call with the same metadata
    (``PVALoss`` caches it, so that a training step pays only for the operator call).

    With ``process_group``, every term is a mean over a set proportional to the batch, so the whole
    batch's terms are one all_reduce of this rank's (core/distributed.py)."""
    check_inputs(config, pred, target, cond_frame, dim_ws)
    group = distributed.check_group(process_group)
    name = backends.resolve(backend, pred.device.type)
    if name == "reference":
        def run_reference(pred, target, cond_frame):
            total, terms = pva_loss_reference(pred, target, cond_frame, config, dim_ws)
            if group is None:
                return total, terms
            values = distributed.global_means(torch.stack([*terms.values(), total]), pred.shape[0], group)
            return values[-1], terms_maker()(tuple(terms), values[:-1])

        return run_reference
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
    op = operator(name, eager=is_eager(pred))
    names, terms_of = config.term_names(), terms_maker()
    loss_type, use_last_frame, use_reg = config.loss_type, config.use_last_frame, config.use_reg

    def run(pred, target, cond_frame):
        terms, total = op(pred, target, cond_frame if use_last_frame else None, part_table, dim_ws,
                          loss_type, use_last_frame, use_reg)
        if group is not None:
            values = distributed.global_means(torch.cat([terms, total[None]]), pred.shape[0], group)
            terms, total = values[:-1], values[-1]
        return total, terms_of(names, terms)

    return run
