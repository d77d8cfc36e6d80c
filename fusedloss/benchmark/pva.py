"""Benchmark cases of the PVA loss: Ditto's [B, 80, 265] with every term on.

Bytes a fused implementation must move (N = B*L*D elements of s bytes, cond_frame B*D):
forward reads pred and target (2N); backward reads them again and writes d/dpred (3N); the
full step is both (5N). Only pred requires grad, as in training.
"""

from __future__ import annotations

import torch

from ..functional import pva_loss
from . import Case

SEQUENCE, DIM = 80, 265
BATCHES = (8, 64, 512)
LARGE_BATCH = {"cuda": 4096, "cpu": 1024}


def make_case(B: int) -> Case:
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(B, SEQUENCE, DIM, generator=g).to(device, dtype)
        target = torch.randn(B, SEQUENCE, DIM, generator=g).to(device, dtype)
        cond = torch.randn(B, DIM, generator=g).to(device, dtype)
        dim_ws = torch.linspace(0.5, 1.5, DIM, dtype=torch.float64, device=device)

        def loss(inputs, backend):
            total, _ = pva_loss(*inputs, use_last_frame_loss=True, use_reg_loss=True, dim_ws=dim_ws, backend=backend)
            return total

        return (pred, target, cond), loss

    n, cond = B * SEQUENCE * DIM, B * DIM
    return Case(
        family="pva",
        name=f"pva [{B}, {SEQUENCE}, {DIM}]",
        make=make,
        elements={"forward": 2 * n + cond, "backward": 3 * n + cond, "full": 5 * n + 2 * cond},
        writes={"forward": 0, "backward": n, "full": n},
    )


def cases(device: torch.device, batches=None) -> list[Case]:
    """Ditto's shape for B = 8, 64, 512 and a large B (or the batch sizes asked for)."""
    return [make_case(B) for B in (batches or BATCHES + (LARGE_BATCH.get(device.type, 1024),))]
