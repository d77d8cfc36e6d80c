"""The blendshape loss's functional form: validate -> choose the backend -> call its operator.

``blendshape_plan`` is the whole route of a call (``BlendshapeLoss`` caches it per input
signature): it checks the inputs, resolves the backend, and returns ``run``, which calls
  reference   ``reference.blendshape_loss_reference`` (PyTorch's autograd)
  cpu, cuda   ``torch.ops.fusedloss.blendshape_forward`` (C++; its autograd is C++ too,
              csrc/common/autograd.h)
  triton      this family's Triton operator ``triton.blendshape_forward`` (its autograd:
              core/autograd.py), eagerly as the ``autograd.Function`` ``blendshape_forward_eager``
  over a process group: ``distributed.py``: the reference on the reduced statistics, or
              ``fused_over_group``: the same operators and autograd formula (core/autograd.py),
              the forward's terms reduced over the group and the gradients scaled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from ..core import checks, distributed
from ..core.autograd import is_eager
from ..core.terms import terms_maker
from . import distributed as over_group
from .config import BlendshapeConfig, check_inputs, computed_terms, landmark_gram
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
            (e.g. ``DUAL_STREAM_GROUPS``, the mouth and expression groups), replacing the default form.
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
    landmark_matrix: torch.Tensor | None = None,
    backend: str = "auto",
    components: bool = True,
    process_group=None,
) -> dict[str, torch.Tensor]:
    """The terms (and "total") for a validated configuration; only "total" without ``components``."""
    run = blendshape_plan(pred, target, raw_pred, prev_pred, config, landmark_matrix=landmark_matrix, backend=backend,
                          process_group=process_group)
    total, terms = run(pred, target, raw_pred, prev_pred)
    out = dict(terms) if components else {}
    out["total"] = total
    return out


def operators(backend: str, eager: bool = False):
    """(forward, backward) operators of a fused backend: the C++ ones (cpu, cuda) or this family's
    Triton ones; ``eager``: the forward for an eager call on real tensors (Triton: the same autograd
    formula as an ``autograd.Function`` calling the launchers, core/autograd.py)."""
    if backend == "triton":
        from . import triton

        return triton.blendshape_forward_eager if eager else triton.blendshape_forward, triton.blendshape_backward
    return torch.ops.fusedloss.blendshape_forward.default, torch.ops.fusedloss.blendshape_backward.default


def blendshape_plan(pred, target, raw_pred, prev_pred, config: BlendshapeConfig, *, settings=None,
                    landmark_matrix=None, backend: str = "auto", process_group=None) -> Callable:
    """Validate one call's metadata and choose the backend; returns ``run(pred, target, raw_pred,
    prev_pred) -> (total, terms)`` (``terms``: the computed terms, unweighted) for every call with
    the same metadata. ``settings`` is the float64 table of the weights and the threshold
    (``layout.SETTINGS``; made from ``config`` when None), which the fused kernels read: a module
    passes its own. Only which weights are non-zero (``config.nonzero``) shapes the plan of a
    fused backend; their values are read from ``settings`` when the kernels run."""
    check_inputs(config, pred, target, raw_pred, prev_pred, landmark_matrix)
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
    computed, term_mask = computed_terms(config.nonzero, pred.dim(), raw_pred is not None, prev_pred is not None)
    # Tiny tables: asynchronous copies (from pageable memory, staged at once) never sync.
    settings = (settings if settings is not None else config.settings()).to(pred.device, non_blocking=True)
    group_coef = None
    if "perceptual" in computed and config.groups is not None:
        group_coef = config.group_coef().to(pred.device, non_blocking=True)
    gram, landmark_rows = None, 0
    if "landmark" in computed:
        gram, landmark_rows = landmark_gram(landmark_matrix).to(pred.device, non_blocking=True), landmark_matrix.shape[0]
    smoothing, consistency, terms_of = "smoothing" in computed, "consistency" in computed, terms_maker()
    if group is None:
        forward = operators(name, eager=is_eager(pred))[0]
    else:  # the same operators and autograd formula, the terms reduced over the group
        weight_index = torch.tensor([TERMS.index(t) for t in computed], dtype=torch.int64).to(pred.device,
                                                                                              non_blocking=True)
        forward = over_group.fused_over_group(operators(name), computed, weight_index, group)

    def run(pred, target, raw_pred, prev_pred):
        # prev_pred is a constant of the loss: detached, so backward never walks into its history.
        prev = (prev_pred.detach() if prev_pred.requires_grad else prev_pred) if consistency else None
        raw = raw_pred if smoothing else None
        terms, total, *_ = forward(pred, target, raw, prev, settings, group_coef, gram, landmark_rows, term_mask)
        return total, terms_of(computed, terms)

    return run
