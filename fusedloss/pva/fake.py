"""The PVA operators' fake implementations (their outputs' shapes and dtypes, for
torch.compile and FakeTensorMode), shared by the C++ (cpu, cuda) and Triton operators.

``fusedloss::pva_forward(pred, target, cond_frame?, part_table, dim_ws?, loss_type, use_last_frame,
use_reg) -> (terms [P*K], total [])`` computes every term of every part, the terms of a part in
the order P V A [L] [R] (``layout.STATS``), and ``pva_backward`` maps d(loss)/d(terms) and
d(loss)/d(total) to the gradients of pred, target and cond_frame. The part table is the float64
``[P, layout.TABLE_COLUMNS]`` table of ``PVAConfig.part_table()``. Schemas: csrc/pva/pva.cpp;
the math: csrc/pva/pva_math.h and docs/losses.md §1.
"""

from __future__ import annotations

from ..core.numerics import acc_dtype


def terms_per_part(use_last_frame: bool, use_reg: bool) -> int:
    return 3 + int(use_last_frame) + int(use_reg)


def empty_terms(pred, num_parts: int, use_last_frame: bool, use_reg: bool):
    """The forward outputs: terms [P * K] and total [], of the arithmetic dtype."""
    acc = acc_dtype(pred.dtype)
    num_terms = num_parts * terms_per_part(use_last_frame, use_reg)
    return pred.new_empty((num_terms,), dtype=acc), pred.new_empty((), dtype=acc)


def empty_gradients(pred, output_mask, use_last_frame: bool):
    """The backward outputs (pred's dtype, contiguous), an empty tensor for each one not wanted."""
    B, L, D = pred.shape
    return (
        pred.new_empty((B, L, D) if output_mask[0] else (0,)),
        pred.new_empty((B, L, D) if output_mask[1] else (0,)),
        pred.new_empty((B, D) if output_mask[2] and use_last_frame else (0,)),
    )


def forward_fake(pred, target, cond_frame, part_table, dim_ws, loss_type, use_last_frame, use_reg):
    return empty_terms(pred, part_table.shape[0], use_last_frame, use_reg)


def backward_fake(grad_terms, grad_total, pred, target, cond_frame, part_table, dim_ws, loss_type,
                  use_last_frame, use_reg, output_mask):
    return empty_gradients(pred, output_mask, use_last_frame)

