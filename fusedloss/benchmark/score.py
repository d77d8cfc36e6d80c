"""Benchmark cases of the score loss (TIGAS): ``CombinedLoss`` from 16 to a million scores.

The loss is called through ``CombinedLoss`` (as the seed does), for every backend alike, with
``check_finite=False`` (the check adds one host sync per call, the same for every backend).
Half the labels are real. The reference builds the [B, B] pair matrix: eagerly it runs only
where that fits (B <= REFERENCE_EAGER_MAX); torch.compile fuses it into O(B^2)-time reductions
without the matrix, run up to REFERENCE_COMPILE_MAX (beyond, a single call takes minutes).
Elements a fused implementation must move: forward reads scores, logits [B, 2] and labels and
writes the pair counts (5B), backward reads scores, labels and counts and writes d/dscores (4B).
Only scores require grad.

Baseline "torch-sorted": the same loss in plain PyTorch, with the ranking from sorted fake scores,
``searchsorted`` and prefix sums (O(B log B), O(B) memory), differentiated by autograd: what a
PyTorch user would write instead of the pair matrix. (Pairs exactly at the hinge count as
inactive there; it is a timing baseline, not an oracle.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..score import CombinedLoss
from . import Case

BATCHES = (16, 256, 4096, 65536, 1_000_000)
REFERENCE_EAGER_MAX = 8192
REFERENCE_COMPILE_MAX = {"cpu": 4096, "cuda": 65536}


def sorted_combined_loss(scores: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.5,
                         weights=(1.0, 0.3, 0.2)) -> torch.Tensor:
    """CombinedLoss's total in plain PyTorch, the ranking in O(B log B) (the "torch-sorted" baseline)."""
    s, y = scores.float(), labels.float()
    real = y > 0.5
    regression = ((s - y) ** 2).mean()
    classification = F.cross_entropy(logits.float(), real.long())
    # Fake scores ascending, reals as -inf first; the active fakes of a real score r are those >= r - m.
    fakes, _ = torch.sort(torch.where(real, float("-inf"), s))
    finite_fakes = torch.where(torch.isinf(fakes), 0.0, fakes)
    prefix = torch.cat([finite_fakes.new_zeros(1), torch.cumsum(finite_fakes, 0)])
    first = torch.searchsorted(fakes.detach(), (s - margin).detach())
    count = (s.shape[0] - first).to(s.dtype)
    hinges = count * (margin - s) + (prefix[-1] - prefix[first])  # sum over the active fakes of r
    n_real = real.sum()
    pairs = (n_real * (s.shape[0] - n_real)).clamp_min(1).to(s.dtype)
    ranking = torch.where(real, hinges, 0.0).sum() / pairs
    return weights[0] * regression + weights[1] * classification + weights[2] * ranking


def make_case(B: int) -> Case:
    def make(device, dtype):
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(B, generator=g).to(device, dtype)
        logits = torch.randn(B, 2, generator=g).to(device, dtype)
        labels = (torch.rand(B, generator=g) < 0.5).to(device, dtype)
        modules = {}  # one CombinedLoss per backend, as a training loop holds it

        def loss(inputs, backend):
            if backend == "torch-sorted":
                return sorted_combined_loss(*inputs)
            if backend not in modules:
                modules[backend] = CombinedLoss(check_finite=False, backend=backend).to(device)
            return modules[backend](*inputs)[0]

        return (scores, logits, labels), loss

    def runs(backend: str, mode: str, device: torch.device) -> bool:
        if backend != "reference":
            return True
        if mode == "eager":
            return B <= REFERENCE_EAGER_MAX
        return B <= REFERENCE_COMPILE_MAX.get(device.type, 0)

    return Case(family="score", name=f"score B={B}", make=make,
                elements={"forward": 5 * B, "backward": 4 * B, "full": 9 * B},
                writes={"forward": B, "backward": B, "full": 2 * B}, runs=runs,
                baselines=("torch-sorted",))


def cases(device: torch.device, batches=None) -> list[Case]:
    return [make_case(B) for B in BATCHES if batches is None or B in batches]
