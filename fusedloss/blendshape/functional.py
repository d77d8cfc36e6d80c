"""The blendshape loss's functional form: validate -> choose the backend -> call its operator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from ..core import checks, distributed
from ..core.autograd import constant, is_eager
from ..core.registry import backward_op, forward_op
from ..core.terms import terms_of
from . import distributed as over_group
from .config import BlendshapeConfig, check_inputs, computed_terms
from .config import landmark_gram as gram_of
from .layout import TERMS
from .reference import blendshape_loss_reference


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
    process_group=None,
):
    """MSE + L1 + perceptual (+ temporal, landmark, smoothing, consistency) loss of KoeMorph (docs/losses.md §2).

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
        process_group: a ``torch.distributed`` group whose ranks each pass a slice of the batch:
            every rank gets the loss of the whole batch, with the importance weights of the whole
            batch's target (docs/losses.md §5). None: this batch.

    Returns:
        ``total``, or ``(total, terms)`` with ``return_components=True``: differentiable 0-dim
        tensors, float32 for 16-bit inputs, no host synchronisation.
    """
    config = BlendshapeConfig.build(
        mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight, smoothing_weight,
        consistency_weight, threshold, perceptual_groups,
    )
    return_components = checks.flag("return_components", return_components)
    terms = blendshape_loss_from_config(pred, target, raw_pred, prev_pred, config, landmark_matrix=landmark_matrix,
                                        backend=backend, components=return_components, process_group=process_group)
    return (terms["total"], terms) if return_components else terms["total"]


def blendshape_loss_from_config(
    pred: torch.Tensor,
    target: torch.Tensor,
    raw_pred: torch.Tensor | None,
    prev_pred: torch.Tensor | None,
    config: BlendshapeConfig,
    *,
    nonzero: tuple[bool, ...] | None = None,
    settings: torch.Tensor | None = None,
    group_coef: torch.Tensor | None = None,
    landmark_matrix: torch.Tensor | None = None,
    landmark_gram: torch.Tensor | None = None,
    backend: str = "auto",
    components: bool = True,
    process_group=None,
) -> dict[str, torch.Tensor]:
    """The terms (and "total") for a validated configuration; only "total" without ``components``."""
    run = blendshape_plan(pred, target, raw_pred, prev_pred, config, nonzero=nonzero, settings=settings,
                          group_coef=group_coef, landmark_matrix=landmark_matrix, landmark_gram=landmark_gram,
                          backend=backend, process_group=process_group)
    total, terms = run(pred, target, raw_pred, prev_pred)
    out = dict(terms) if components else {}
    out["total"] = total
    return out


def blendshape_plan(pred, target, raw_pred, prev_pred, config: BlendshapeConfig, *,
                    nonzero: tuple[bool, ...] | None = None, settings=None, group_coef=None, landmark_matrix=None,
                    landmark_gram=None, backend: str = "auto", process_group=None) -> Callable:
    """Validate one call's metadata and choose the backend; returns ``run(pred, target, raw_pred,
    prev_pred) -> (total, terms)`` (``terms``: the computed terms, unweighted) for every call with
    the same metadata. ``BlendshapeLoss`` passes its device buffers (settings, group_coef,
    landmark_gram) and which weights are non-zero, so that changing a weight's value touches only
    the settings buffer, and caches the plan. With ``process_group``: blendshape/distributed.py."""
    nonzero = nonzero if nonzero is not None else tuple(w != 0 for w in config.weights)
    check_inputs(config, pred, target, raw_pred, prev_pred, landmark_matrix, nonzero)
    group = distributed.check_group(process_group)
    name = backends.resolve(backend, pred.device.type)
    if name == "reference" or (pred.shape[0] == 0 and group is None):
        def run_reference(pred, target, raw_pred, prev_pred):
            if group is not None:
                return over_group.reference_over_group(pred, target, raw_pred, prev_pred, config, landmark_matrix,
                                                       group)
            terms = blendshape_loss_reference(pred, target, raw_pred, prev_pred, config, landmark_matrix)
            return terms.pop("total"), terms

        return run_reference
    computed, term_mask = computed_terms(nonzero, pred.dim(), raw_pred is not None, prev_pred is not None)
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
            landmark_gram = gram_of(landmark_matrix)
    else:
        landmark_gram = None
    op = forward_op("blendshape", name, eager=is_eager(pred))
    smoothing, consistency = "smoothing" in computed, "consistency" in computed
    ops = weight_index = None  # (bound either way: torch.compile reads every cell of ``run``)
    if group is not None:
        ops = (forward_op("blendshape", name), backward_op("blendshape", name))
        weight_index = torch.tensor([TERMS.index(t) for t in computed], dtype=torch.int64).to(pred.device,
                                                                                              non_blocking=True)

    def run(pred, target, raw_pred, prev_pred):
        # prev_pred is a constant of the loss: detached, so backward never walks into its history.
        prev = (constant(prev_pred) if consistency else None)
        raw = raw_pred if smoothing else None
        if group is not None:
            terms, total = over_group.FusedOverGroup.apply(pred, target, raw, prev, settings, group_coef, landmark_gram,
                                                           landmark_rows, term_mask, computed, weight_index, ops,
                                                           group)
        else:
            terms, total, _ = op(pred, target, raw, prev, settings, group_coef, landmark_gram, landmark_rows,
                                 term_mask)
        return total, terms_of(computed, terms)

    return run
