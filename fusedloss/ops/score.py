"""Score loss (TIGAS): configuration, input validation, the finiteness check, and operator glue.

The fused kernels read the weights and the margin as runtime data, a float64 [4] settings table
(regression, classification and ranking weights, then the margin), so changing one recompiles
nothing. Which terms a call computes is a bit mask in TERMS order: ``CombinedLoss`` computes all
three, ``AllPairsMarginRankingLoss`` only the ranking (it has no logits).

Each backend's forward returns (terms [3], total [], counts, rank_scale, status):
  counts      int32 [B]: the signed number of active pairs of each score (-n for a real score,
              +n for a fake one), the ranking's gradient up to rank_scale; [0] without ranking
  rank_scale  float64 []: 1 / (|R| |F|) for reduction "mean" (0 without pairs), 1 for "sum"
  status      int32 []: bit 0 a non-finite score, bit 1 a non-finite logit, bit 2 a non-finite total
See csrc/score_math.h for the math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks
from ._autograd import register_terms_autograd

TERMS = ("regression", "classification", "ranking")
REGRESSION_TYPES = ("mse", "smoothl1")
REDUCTIONS = ("mean", "sum")
ALL_TERMS = 0b111
RANKING_ONLY = 0b100
MARGIN = 3  # position of the margin in the settings table
# Bits of the status, and what each names.
STATUS_NAMES = ((1, "scores"), (2, "logits"), (4, "total"))


@dataclass(frozen=True)
class ScoreConfig:
    weights: tuple[float, float, float]  # TERMS order
    margin: float
    regression_type: str
    reduction: str

    @classmethod
    def build(cls, regression_weight=1.0, classification_weight=0.3, ranking_weight=0.2, regression_type="mse",
              margin=0.5, reduction="mean") -> ScoreConfig:
        values = (regression_weight, classification_weight, ranking_weight)
        weights = tuple(_checks.real(f"{name}_weight", v) for name, v in zip(TERMS, values))
        return cls(weights, _checks.real("margin", margin), _checks.choice("regression_type", regression_type,
                                                                          REGRESSION_TYPES),
                   _checks.choice("reduction", reduction, REDUCTIONS))

    def settings(self) -> torch.Tensor:
        """The float64 [4] settings table the fused kernels read, on the CPU."""
        return torch.tensor(self.weights + (self.margin,), dtype=torch.float64)


def check_flat(name: str, value: torch.Tensor, B: int) -> None:
    """``value`` must be [B] or [B, 1] (every backend reads both along dim 0)."""
    if not (value.dim() == 1 or (value.dim() == 2 and value.shape[1] == 1)) or value.shape[0] != B:
        raise ValueError(f"{name} must be [B] or [B, 1] with B = {B}, got shape {tuple(value.shape)}")


def check_inputs(scores, logits, labels, *, need_logits: bool) -> None:
    """Validate one call's tensors (metadata only, no sync)."""
    _checks.tensor("scores", scores, shape_doc="[B] or [B, 1]")
    if scores.dim() not in (1, 2) or (scores.dim() == 2 and scores.shape[1] != 1):
        raise ValueError(f"scores must be [B] or [B, 1], got shape {tuple(scores.shape)}")
    B = scores.shape[0]
    _checks.tensor("labels", labels, shape_doc="[B] or [B, 1] of floats in [0, 1]")
    if labels.device != scores.device:
        raise ValueError(f"labels must be on scores' device {scores.device}, got {labels.device}")
    check_flat("labels", labels, B)
    if need_logits:
        _checks.tensor("logits", logits, rank=2, shape_doc="[B, 2]")
        _checks.same_tensor_kind("logits", logits, "scores", scores)
        if tuple(logits.shape) != (B, 2):
            raise ValueError(f"logits must be [B, 2] with B = {B}, got shape {tuple(logits.shape)}")
    if B >= 2**31:
        raise ValueError(f"scores may hold at most 2^31 - 1 values, got {B}")


# ---------------------------------------------------------------------------------------------
# Fail-fast: one host sync per call, in an operator so torch.compile keeps it in the graph
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedloss::finite_or_raise", mutates_args=())
def finite_or_raise(total: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
    """``total`` (a copy), after one host sync on ``status``; raises RuntimeError naming the first
    non-finite value in scores, logits, or the total."""
    bits = int(status.item())
    for bit, name in STATUS_NAMES:
        if bits & bit:
            raise RuntimeError(f"CombinedLoss: NaN/Inf detected in {name} (check_finite=True)")
    return total.clone()


@finite_or_raise.register_fake
def _(total, status):
    return torch.empty_like(total)


def _finite_or_raise_backward(ctx, grad):
    return grad, None


finite_or_raise.register_autograd(_finite_or_raise_backward)


def status_of(scores: torch.Tensor, logits: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor:
    """The status bits from PyTorch ops (the reference backend's; the fused kernels make their own)."""
    status = (~torch.isfinite(scores).all()).to(torch.int32) | ((~torch.isfinite(total)).to(torch.int32) << 2)
    if logits is not None:
        status = status | ((~torch.isfinite(logits).all()).to(torch.int32) << 1)
    return status


# ---------------------------------------------------------------------------------------------
# Operator glue shared by the C++ (cpu, cuda) and Triton backends
# ---------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def label_dtype(scores_dtype: torch.dtype, labels_dtype: torch.dtype) -> torch.dtype:
    """Kernels read labels in scores' dtype or in the arithmetic type (others are converted to it)."""
    return labels_dtype if labels_dtype in (scores_dtype, acc_dtype(scores_dtype)) else acc_dtype(scores_dtype)


def forward_fake(scores, logits, labels, settings, terms, smooth_l1, ranking_sum):
    acc = acc_dtype(scores.dtype)
    B = scores.shape[0] if terms & RANKING_ONLY else 0
    return (scores.new_empty((3,), dtype=acc), scores.new_empty((), dtype=acc),
            scores.new_empty((B,), dtype=torch.int32), scores.new_empty((), dtype=torch.float64),
            scores.new_empty((), dtype=torch.int32))


def backward_fake(grad_terms, grad_total, counts, rank_scale, scores, logits, labels, settings, terms, smooth_l1,
                  ranking_sum, output_mask):
    with_logits = output_mask[1] and terms & 0b010
    return (scores.new_empty(scores.shape if output_mask[0] else (0,)),
            logits.new_empty((scores.shape[0], 2)) if with_logits else scores.new_empty((0,)))


# scores and logits receive gradients; labels (2) are targets, constants of the loss (no gradient).
GRAD_INPUTS = (0, 1)


def register_cpp() -> None:
    """Fake implementations of the C++ operators ``fusedloss::score_forward`` / ``score_backward``
    (their autograd is registered in C++: csrc/autograd.h)."""
    torch.library.register_fake("fusedloss::score_forward")(forward_fake)
    torch.library.register_fake("fusedloss::score_backward")(backward_fake)


def register_triton(forward_op, backward_op):
    """Autograd of the Triton operators (ops/_autograd.py); returns their eager form."""
    return register_terms_autograd(forward_op, backward_op, GRAD_INPUTS, num_aux=2, constants=(2,))


def forward_op(backend: str, *, eager: bool = False):
    """The forward operator of a fused backend (autograd, fake tensors and compile included).
    ``eager``: for an eager call on real tensors (Triton: the same formula without the dispatcher,
    ops/_autograd.py)."""
    if backend == "triton":
        from ..triton import score as triton_score

        return triton_score.score_forward_eager if eager else triton_score.score_forward
    return torch.ops.fusedloss.score_forward.default
