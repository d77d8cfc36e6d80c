"""Benchmark cases of the blendshape loss (KoeMorph): the seeds' shapes and a large batch.

The loss is called through ``BlendshapeLoss`` (as the seeds do), for every backend alike.
Bytes a fused implementation must move (N elements of s bytes): forward reads pred and target
(2N), backward reads them again and writes d/dpred (3N), the full step 5N. Only pred requires
grad, as in training.
"""

from __future__ import annotations

import torch

from ..blendshape import BlendshapeLoss
from ..blendshape.config import DUAL_STREAM_GROUPS
from . import Case

# (label, shape, loss arguments)
SHAPES = (
    ("seed 000", (16, 52), {}),
    ("seed 001 groups", (4, 52), {"perceptual_groups": DUAL_STREAM_GROUPS}),
    ("temporal", (16, 256, 52), {"temporal_weight": 0.2}),
    ("large", (65536, 52), {}),
)
CPU_SHAPES = (("cpu goal", (4096, 52), {}),)


def make_case(label: str, shape: tuple[int, ...], kwargs: dict) -> Case:
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        pred = torch.rand(shape, generator=g).to(device, dtype)
        target = torch.rand(shape, generator=g).to(device, dtype)

        modules = {}  # one BlendshapeLoss per backend, as a training loop holds it

        def loss(inputs, backend):
            if backend not in modules:
                modules[backend] = BlendshapeLoss(**kwargs, backend=backend).to(device)
            return modules[backend](*inputs)

        return (pred, target), loss

    n = 1
    for size in shape:
        n *= size
    return Case(
        family="blendshape",
        name=f"blendshape {list(shape)} {label}",
        make=make,
        elements={"forward": 2 * n, "backward": 3 * n, "full": 5 * n},
        writes={"forward": 0, "backward": n, "full": n},
    )


def cases(device: torch.device, batches=None) -> list[Case]:
    shapes = SHAPES + (CPU_SHAPES if device.type == "cpu" else ())
    return [make_case(*s) for s in shapes if batches is None or s[1][0] in batches]
