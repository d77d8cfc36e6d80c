"""Functional entry points: validate -> choose the backend -> call its operator.

Each function takes the same arguments as its module's constructor, plus the tensors, and
``backend="auto" | "triton" | "cuda" | "cpu" | "reference"`` (see ``fusedloss.backends``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch._subclasses.fake_tensor import is_fake  # (loaded by torch itself)

from . import _checks, backends
from ._terms import Terms
from .ops import blendshape as blendshape_ops
from .ops import pva as pva_ops
from .ops import score as score_ops
from .reference import (
    all_pairs_margin_ranking_reference,
    blendshape_loss_reference,
    pva_loss_reference,
    score_loss_reference,
)

__all__ = ["pva_loss", "blendshape_loss", "combined_loss", "all_pairs_margin_ranking_loss"]


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
    run = pva_plan(pred, target, cond_frame, config, part_table=part_table, dim_ws=dim_ws, backend=backend)
    return run(pred, target, cond_frame)


def pva_plan(pred, target, cond_frame, config: pva_ops.PVAConfig, *, part_table=None, dim_ws=None,
             backend: str = "auto") -> Callable:
    """Validate one call's metadata (types, shapes, dtypes, devices) and choose the backend; returns
    ``run(pred, target, cond_frame) -> (total, terms)`` for every call with the same metadata
    (``PVALoss`` caches it, so that a training step pays only for the operator call)."""
    pva_ops.check_inputs(config, pred, target, cond_frame, dim_ws)
    name = backends.resolve(backend, pred.device.type)
    if name == "reference":
        return lambda pred, target, cond_frame: pva_loss_reference(pred, target, cond_frame, config, dim_ws)
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
    op = pva_ops.forward_op(name, eager=_eager(pred))
    names = config.term_names()
    loss_type, use_last_frame, use_reg = config.loss_type, config.use_last_frame, config.use_reg

    def run(pred, target, cond_frame):
        terms, total = op(pred, target, cond_frame if use_last_frame else None, part_table, dim_ws,
                          loss_type, use_last_frame, use_reg)
        return total, _terms_of(names, terms)

    return run


def blendshape_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: torch.Tensor | None = None,
    prev_pred: torch.Tensor | None = None,
    mse_weight: float = 1.0,
    l1_weight: float = 0.1,
    perceptual_weight: float = 0.5,
    temporal_weight: float = 0.0,
    landmark_weight: float = 0.0,
    smoothing_weight: float = 0.0,
    consistency_weight: float = 0.0,
    threshold: float = 0.1,
    perceptual_groups=None,
    landmark_matrix: torch.Tensor | None = None,
    backend: str = "auto",
    return_components: bool = False,
):
    """MSE + L1 + perceptual (+ temporal, landmark, smoothing, consistency) loss of KoeMorph (SPEC §2).

    Args:
        pred, target: ``[B, K]`` or ``[B, T, K]`` blendshape weights (K = 52 for ARKit).
        raw_pred: the model's output before its temporal smoothing (smoothing term), or None.
        prev_pred: the previous prediction (consistency term; no gradient flows to it), or None.
        *_weight: weight of each term in the total; a term is computed only when its weight is
            non-zero and its inputs are given (temporal needs ``[B, T, K]``).
        threshold: activity threshold of the default perceptual form.
        perceptual_groups: ``[(indices, weight), ...]``: the group form of the perceptual term
            (seed 001's mouth and expression groups), replacing the default form.
        landmark_matrix: ``[J, K]`` blendshape-to-landmark matrix (landmark term; no gradient).
        backend: which implementation runs it.
        return_components: also return the dict of computed terms (unweighted) and "total".

    Returns:
        ``total``, or ``(total, terms)`` with ``return_components=True``: differentiable 0-dim
        tensors, float32 for 16-bit inputs, no host synchronisation.
    """
    config = blendshape_ops.BlendshapeConfig.build(
        mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight, smoothing_weight,
        consistency_weight, threshold, perceptual_groups,
    )
    return_components = _checks.flag("return_components", return_components)
    terms = blendshape_loss_from_config(pred, target, raw_pred, prev_pred, config, landmark_matrix=landmark_matrix,
                                        backend=backend, components=return_components)
    return (terms["total"], terms) if return_components else terms["total"]


def blendshape_loss_from_config(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: torch.Tensor | None,
    prev_pred: torch.Tensor | None,
    config: blendshape_ops.BlendshapeConfig,
    *,
    nonzero: tuple[bool, ...] | None = None,
    settings: torch.Tensor | None = None,
    group_coef: torch.Tensor | None = None,
    landmark_matrix: torch.Tensor | None = None,
    landmark_gram: torch.Tensor | None = None,
    backend: str = "auto",
    components: bool = True,
) -> dict[str, torch.Tensor]:
    """The terms (and "total") for a validated configuration; only "total" without ``components``."""
    run = blendshape_plan(pred, target, raw_pred, prev_pred, config, nonzero=nonzero, settings=settings,
                          group_coef=group_coef, landmark_matrix=landmark_matrix, landmark_gram=landmark_gram,
                          backend=backend)
    total, terms = run(pred, target, raw_pred, prev_pred)
    out = dict(terms) if components else {}
    out["total"] = total
    return out


def blendshape_plan(pred, target, raw_pred, prev_pred, config: blendshape_ops.BlendshapeConfig, *,
                    nonzero: tuple[bool, ...] | None = None, settings=None, group_coef=None, landmark_matrix=None,
                    landmark_gram=None, backend: str = "auto") -> Callable:
    """Validate one call's metadata and choose the backend; returns ``run(pred, target, raw_pred,
    prev_pred) -> (total, terms)`` (``terms``: the computed terms, unweighted) for every call with
    the same metadata. ``BlendshapeLoss`` passes its device buffers (settings, group_coef,
    landmark_gram) and which weights are non-zero, so that changing a weight's value touches only
    the settings buffer, and caches the plan."""
    nonzero = nonzero if nonzero is not None else tuple(w != 0 for w in config.weights)
    blendshape_ops.check_inputs(config, pred, target, raw_pred, prev_pred, landmark_matrix, nonzero)
    name = backends.resolve(backend, pred.device.type)
    if name == "reference" or pred.shape[0] == 0:
        def run_reference(pred, target, raw_pred, prev_pred):
            terms = blendshape_loss_reference(pred, target, raw_pred, prev_pred, config, landmark_matrix)
            return terms.pop("total"), terms

        return run_reference
    computed, mask = blendshape_ops.computed_terms(nonzero, pred.dim(), raw_pred is not None, prev_pred is not None)
    # Tiny tables: asynchronous copies (from pageable memory, staged at once) never sync.
    settings = (settings if settings is not None else config.settings()).to(pred.device, non_blocking=True)
    if "perceptual" in computed and config.groups is not None:
        group_coef = (group_coef if group_coef is not None else config.group_coef()).to(pred.device, non_blocking=True)
    else:
        group_coef = None
    landmark_rows = 0
    if "landmark" in computed:
        landmark_rows = landmark_matrix.shape[0]
        if landmark_gram is None:
            landmark_gram = blendshape_ops.landmark_gram(landmark_matrix)
    else:
        landmark_gram = None
    op = blendshape_ops.forward_op(name, eager=_eager(pred))
    smoothing, consistency = "smoothing" in computed, "consistency" in computed

    def run(pred, target, raw_pred, prev_pred):
        # prev_pred is a constant of the loss: detached, so backward never walks into its history.
        prev = (_constant(prev_pred) if consistency else None)
        terms, total, _ = op(pred, target, raw_pred if smoothing else None, prev, settings, group_coef,
                             landmark_gram, landmark_rows, mask)
        return total, _terms_of(computed, terms)

    return run


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Regression + classification + all-pairs margin ranking loss of TIGAS (SPEC §3).

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

    Returns:
        ``(total, terms)``: ``terms`` maps "regression", "classification", "ranking" and "total" to
        differentiable 0-dim tensors (float32 for 16-bit inputs).
    """
    config = score_ops.ScoreConfig.build(regression_weight, classification_weight, ranking_weight, regression_type,
                                         margin)
    terms = score_loss_from_config(scores, logits, labels, config,
                                   check_finite=_checks.flag("check_finite", check_finite), backend=backend)
    return terms["total"], terms


def all_pairs_margin_ranking_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.5,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """max(0, margin - (s_i - s_j)) over every pair of a real score s_i (label > 0.5) and a fake
    score s_j, averaged over the pairs (``reduction="mean"``, 0 without pairs) or summed
    (``"sum"``); SPEC §3's ranking term. Exact, in O(B log B) time and O(B) memory.

    Args:
        scores: ``[B]`` or ``[B, 1]``.
        labels: ``[B]`` or ``[B, 1]`` floats in [0, 1], any float dtype (no gradient).
    """
    config = score_ops.ScoreConfig.build(margin=margin, reduction=reduction)
    return score_loss_from_config(scores, None, labels, config, terms=score_ops.RANKING_ONLY,
                                  backend=backend)["ranking"]


def score_loss_from_config(
    scores: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor,
    config: score_ops.ScoreConfig,
    *,
    settings: torch.Tensor | None = None,
    terms: int = score_ops.ALL_TERMS,
    check_finite: bool = False,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """The terms and "total" for a validated configuration (``CombinedLoss`` passes its settings
    buffer). ``terms`` is ALL_TERMS or RANKING_ONLY (no logits)."""
    run = score_plan(scores, logits, labels, config, settings=settings, terms=terms, check_finite=check_finite,
                     backend=backend)
    return dict(run(scores, logits, labels)[1])


def score_plan(scores, logits, labels, config: score_ops.ScoreConfig, *, settings=None,
               terms: int = score_ops.ALL_TERMS, check_finite: bool = False, backend: str = "auto") -> Callable:
    """Validate one call's metadata and choose the backend; returns ``run(scores, logits, labels) ->
    (total, terms)`` (``terms`` with "total") for every call with the same metadata
    (``CombinedLoss`` caches it)."""
    with_logits = terms == score_ops.ALL_TERMS
    score_ops.check_inputs(scores, logits, labels, need_logits=with_logits)
    name = backends.resolve(backend, scores.device.type)
    if name == "reference" or scores.shape[0] == 0:
        def run_reference(scores, logits, labels):
            if with_logits:
                out = score_loss_reference(scores, logits, labels, config)
            else:
                ranking = all_pairs_margin_ranking_reference(scores, labels, config.margin, config.reduction)
                out = {"ranking": ranking, "total": ranking}
            if check_finite:
                status = score_ops.status_of(scores, logits, out["total"])
                out["total"] = score_ops.finite_or_raise(out["total"], status)
            return out["total"], out

        return run_reference
    # A tiny table: an asynchronous copy (from pageable memory, staged at once) never syncs.
    settings = (settings if settings is not None else config.settings()).to(scores.device, non_blocking=True)
    op = score_ops.forward_op(name, eager=_eager(scores))
    smooth_l1, ranking_sum = config.regression_type == "smoothl1", config.reduction == "sum"

    # Scores and labels go to the operators as given, [B] or [B, 1]; labels are targets (constants
    # of the loss): detached.
    def run(scores, logits, labels):
        values, total, _, _, status = op(scores, logits if with_logits else None, _constant(labels), settings, terms,
                                         smooth_l1, ranking_sum)
        if with_logits:
            if check_finite:
                total = score_ops.finite_or_raise(total, status)
            return total, _terms_of(score_ops.TERMS, values, {"total": total})
        ranking = values[2]  # (the total of the ranking alone is the unweighted ranking)
        if check_finite:
            ranking = score_ops.finite_or_raise(ranking, status)
        return ranking, {"ranking": ranking, "total": ranking}

    return run


def _constant(x: torch.Tensor) -> torch.Tensor:
    """A constant of the loss (a previous prediction, labels) with no autograd history."""
    return x.detach() if x.requires_grad else x


def _eager(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` runs eagerly on real tensors (not traced, not fake)."""
    return not torch.compiler.is_compiling() and not is_fake(x)


def _terms_of(names: tuple[str, ...], values: torch.Tensor, extra: dict | None = None):
    """The named rows of ``values`` (then ``extra``): made lazily in eager mode (``Terms``), a plain
    dict under torch.compile."""
    if torch.compiler.is_compiling():
        out = dict(zip(names, values.unbind(0)))
        if extra:
            out.update(extra)
        return out
    return Terms(names, values, extra)
