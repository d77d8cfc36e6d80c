"""The score losses' functional forms: validate -> choose the backend -> call its operator.

``score_plan`` is the whole route of a call (the modules cache it per input signature): it checks
the inputs, resolves the backend, and returns ``run``, which calls
  reference   ``reference.score_loss_reference`` / ``all_pairs_margin_ranking_reference``
  cpu, cuda   ``torch.ops.fusedloss.score_forward`` (C++; its autograd is C++ too, csrc/common/autograd.h)
  triton      this family's Triton operator ``triton.score_forward`` (its autograd: core/autograd.py),
              eagerly as the ``autograd.Function`` ``score_forward_eager``
  over a process group: the inputs of every rank gathered (core/distributed.py), then the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from ..core import checks, distributed
from ..core.autograd import constant, is_eager
from ..core.terms import terms_maker
from .config import ScoreConfig, check_inputs
from .layout import ALL_TERMS, RANKING_ONLY, TERMS
from .finite import finite_or_raise, status_of
from .reference import all_pairs_margin_ranking_reference, score_loss_reference


def combined_loss(
    scores: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    regression_weight: float = 1.0,
    classification_weight: float = 0.3,
    ranking_weight: float = 0.2,
    regression_type: str = "mse",
    margin: float = 0.5,
    check_finite: bool = True,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Regression + classification + all-pairs margin ranking loss of TIGAS (docs/losses.md §3).

    Args:
        scores: ``[B]`` or ``[B, 1]`` predicted scores.
        logits: ``[B, 2]`` real-vs-fake logits, scores' dtype and device.
        labels: ``[B]`` or ``[B, 1]`` floats in [0, 1] (1 = real; real means > 0.5), any float dtype.
            Targets: no gradient flows to them.
        regression_weight, classification_weight, ranking_weight: weights of the terms in the total.
        regression_type: ``"mse"`` or ``"smoothl1"`` (beta 1).
        margin: margin of the ranking hinge max(0, margin - (s_real - s_fake)), over every
            (real, fake) pair of the batch, averaged over the pairs (0 without pairs).
        check_finite: raise ``RuntimeError`` naming scores, logits or the total when it holds a NaN
            or Inf; costs one host sync per call. ``False`` never syncs.
        backend: which implementation runs it.
        process_group: a ``torch.distributed`` group whose ranks each pass a slice of the batch:
            every rank gets the loss of the whole batch, over every (real, fake) pair of all
            ranks (docs/losses.md §5). None: this batch.

    Returns:
        ``(total, terms)``: ``terms`` maps "regression", "classification", "ranking" and "total" to
        differentiable 0-dim tensors (float32 for 16-bit inputs).
    """
    config = ScoreConfig.build(regression_weight, classification_weight, ranking_weight, regression_type,
                                         margin)
    terms = score_loss_from_config(scores, logits, labels, config,
                                   check_finite=checks.flag("check_finite", check_finite), backend=backend,
                                   process_group=process_group)
    return terms["total"], terms


def all_pairs_margin_ranking_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.5,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """max(0, margin - (s_i - s_j)) over every pair of a real score s_i (label > 0.5) and a fake
    score s_j, averaged over the pairs (``reduction="mean"``, 0 without pairs) or summed
    (``"sum"``); docs/losses.md §3's ranking term. Exact, in O(B log B) time and O(B) memory.

    Args:
        scores: ``[B]`` or ``[B, 1]``.
        labels: ``[B]`` or ``[B, 1]`` floats in [0, 1], any float dtype (no gradient).
        process_group: as in ``combined_loss``: the pairs of the whole batch of the group's ranks.
    """
    config = ScoreConfig.build(margin=margin, reduction=reduction)
    return score_loss_from_config(scores, None, labels, config, term_mask=RANKING_ONLY,
                                  backend=backend, process_group=process_group)["ranking"]


def score_loss_from_config(
    scores: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    config: ScoreConfig,
    *,
    settings: torch.Tensor | None = None,
    term_mask: int = ALL_TERMS,
    check_finite: bool = False,
    backend: str = "auto",
    process_group=None,
) -> dict[str, torch.Tensor]:
    """The terms and "total" for a validated configuration (``CombinedLoss`` passes its settings
    buffer). ``term_mask`` is ALL_TERMS or RANKING_ONLY (no logits)."""
    run = score_plan(scores, logits, labels, config, settings=settings, term_mask=term_mask, check_finite=check_finite,
                     backend=backend, process_group=process_group)
    return dict(run(scores, logits, labels)[1])


def operator(backend: str, eager: bool = False):
    """The forward operator of a fused backend: the C++ one (cpu, cuda) or this family's Triton one;
    ``eager``: for an eager call on real tensors (Triton: the same autograd formula as an
    ``autograd.Function`` calling the launchers, core/autograd.py)."""
    if backend == "triton":
        from . import triton

        return triton.score_forward_eager if eager else triton.score_forward
    return torch.ops.fusedloss.score_forward.default


def score_plan(scores, logits, labels, config: ScoreConfig, *, settings=None,
               term_mask: int = ALL_TERMS, check_finite: bool = False, backend: str = "auto",
               process_group=None) -> Callable:
    """Validate one call's metadata and choose the backend; returns ``run(scores, logits, labels) ->
    (total, terms)`` (``terms`` with "total") for every call with the same metadata
    (``CombinedLoss`` caches it).

    With ``process_group``, the ranking compares every pair of the whole batch: the O(B) inputs of
    every rank are gathered and the loss runs on the whole batch, exactly as one process would run
    it (core/distributed.py)."""
    with_logits = term_mask == ALL_TERMS
    check_inputs(scores, logits, labels, need_logits=with_logits)
    group = distributed.check_group(process_group)
    if group is not None:
        def run_over_group(scores, logits, labels):
            rows = [scores.reshape(-1), constant(labels).reshape(-1)] + ([logits] if with_logits else [])
            scores, labels, *rest = distributed.gather_batch(rows, group)
            logits = rest[0] if with_logits else None
            run = score_plan(scores, logits, labels, config, settings=settings, term_mask=term_mask,
                             check_finite=check_finite, backend=backend)
            return run(scores, logits, labels)

        return run_over_group
    name = backends.resolve(backend, scores.device.type)
    if name == "reference" or scores.shape[0] == 0:
        def run_reference(scores, logits, labels):
            if with_logits:
                out = score_loss_reference(scores, logits, labels, config)
            else:
                ranking = all_pairs_margin_ranking_reference(scores, labels, config.margin, config.reduction)
                out = {"ranking": ranking, "total": ranking}
            if check_finite:
                status = status_of(scores, logits, out["total"])
                out["total"] = finite_or_raise(out["total"], status)
            return out["total"], out

        return run_reference
    # A tiny table: an asynchronous copy (from pageable memory, staged at once) never syncs.
    settings = (settings if settings is not None else config.settings()).to(scores.device, non_blocking=True)
    op = operator(name, eager=is_eager(scores))
    smooth_l1, ranking_sum, terms_of = config.regression_type == "smoothl1", config.reduction == "sum", terms_maker()

    # Scores and labels go to the operators as given, [B] or [B, 1]; labels are targets (constants
    # of the loss): detached.
    def run(scores, logits, labels):
        labels = labels.detach() if labels.requires_grad else labels
        values, total, _, _, status = op(scores, logits if with_logits else None, labels, settings, term_mask,
                                         smooth_l1, ranking_sum)
        if with_logits:
            if check_finite:
                total = finite_or_raise(total, status)
            return total, terms_of(TERMS, values, {"total": total})
        ranking = values[2]  # (the total of the ranking alone is the unweighted ranking)
        if check_finite:
            ranking = finite_or_raise(ranking, status)
        return ranking, {"ranking": ranking, "total": ranking}

    return run
