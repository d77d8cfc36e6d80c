"""Drop-in ``nn.Module``s with the seed systems' signatures. They only hold settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from . import _checks, backends, functional
from .ops import score as score_ops
from .ops.blendshape import TERMS, BlendshapeConfig, landmark_gram
from .ops.pva import PVAConfig

__all__ = ["PVALoss", "BlendshapeLoss", "CombinedLoss", "AllPairsMarginRankingLoss"]


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in backends.BACKENDS)}; got {backend!r}")
    return backend


def _meta(x):
    """What validating a call looks at in one input: its type, shape, dtype and device (an
    AttributeError for an object that is not a tensor)."""
    return None if x is None else (type(x), x.shape, x.dtype, x.device)


class _FusedLoss(nn.Module):
    """What every loss module shares: its float64 tables (buffers) and its cache of call plans.

    A plan (``functional.*_plan``) is a call's validation and backend choice, done once per
    signature of the inputs (``_meta`` of each) and kept, so that an eager training step runs
    little more Python than the operator call. Under torch.compile nothing is cached: the plan is
    made while tracing, once. A changed setting, ``.to()``/``.cuda()``/``.half()`` and the like
    drop the plans.
    """

    _TABLES: tuple[str, ...] = ()  # float64 buffers the kernels read
    _MAX_PLANS = 64  # e.g. one per sequence length; beyond that the cache starts afresh

    def __init__(self) -> None:
        super().__init__()
        self._plans: dict = {}

    def __setattr__(self, name, value):
        # A new backend, configuration or table (buffer) invalidates the plans made with the old.
        plans = self.__dict__.get("_plans")
        if plans and (name in ("backend", "config", "check_finite") or name in self._TABLES):
            plans.clear()
        super().__setattr__(name, value)

    def __getstate__(self):
        # Plans hold closures over this module's tables: a copy (pickle, deepcopy) makes its own.
        state = super().__getstate__()
        return {**state, "_plans": {}}

    def _cached(self, *inputs):
        """(key, cached plan or None) of a call on ``inputs``; no key while torch.compile traces or
        for an input that is not a tensor (the plan made then says what is wrong)."""
        if torch.compiler.is_compiling():
            return None, None
        try:
            key = tuple(map(_meta, inputs))
        except AttributeError:
            return None, None
        return key, self._plans.get(key)

    def _remember(self, key, run):
        if key is not None and not torch.compiler.is_compiling():
            plans = self._plans
            if len(plans) >= self._MAX_PLANS:
                plans.clear()
            plans[key] = run
        return run

    def _apply(self, fn, recurse=True):
        tables = {name: self._buffers.get(name) for name in self._TABLES}
        out = super()._apply(fn, recurse)
        # The tables follow the device but stay float64 (and exact) whatever a module's .half() or
        # .to(dtype) does to its buffers.
        for name, table in tables.items():
            moved = self._buffers.get(name)
            if table is not None and moved is not None and moved.dtype != torch.float64:
                self._buffers[name] = table.to(moved.device)
        self._plans.clear()
        return out


def _buffers_on(module: nn.Module, names: tuple[str, ...], device: torch.device) -> list[torch.Tensor | None]:
    """The module's buffers on ``device``. A module left on another device moves them there for
    good on its first (eager) call, with asynchronous copies."""
    buffers = module._buffers  # (a dict: cheaper than attribute lookups through nn.Module)
    out = [buffers[name] for name in names]
    for i, (name, buffer) in enumerate(zip(names, out)):
        if buffer is not None and buffer.device != device:
            out[i] = buffer.to(device, non_blocking=True)
            if not torch.compiler.is_compiling():
                buffers[name] = out[i]
    return out


class PVALoss(_FusedLoss):
    """Ditto's per-part position / velocity / acceleration loss (SPEC §1), fused.

    ``forward(pred [B, L, D], target [B, L, D], cond_frame [B, D] | None) -> (total, terms)``;
    ``terms`` maps ``f"{part}_{P|V|A|L|R}"`` to 0-dim tensors (Ditto's trainer sums them).
    Arguments as ``fusedloss.functional.pva_loss``. ``part_w_dict`` takes Ditto's form
    ``{name: [start, end, weight]}``; ``dim_ws`` may be a tensor or an array-like of D weights.

    The part table and ``dim_ws`` are (non-persistent) buffers: they follow ``.to(device)``, and a
    module left on the CPU moves them to the inputs' device on its first call.
    """

    _TABLES = ("part_table", "dim_ws")

    def __init__(
        self,
        part_w_dict: Mapping | None = None,
        use_last_frame_loss: bool = False,
        use_reg_loss: bool = False,
        dim_ws=None,
        loss_type: str = "l2",
        reg_weights: Mapping | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.config = PVAConfig.build(part_w_dict, use_last_frame_loss, use_reg_loss, loss_type, reg_weights)
        self.backend = _check_backend(backend)
        self.register_buffer("part_table", self.config.part_table(), persistent=False)
        if dim_ws is not None:
            dim_ws = torch.as_tensor(dim_ws).detach().to(torch.float64)
            if dim_ws.dim() != 1:
                raise ValueError(f"dim_ws must be [D], got shape {tuple(dim_ws.shape)}")
        self.register_buffer("dim_ws", dim_ws, persistent=False)

    def set_part_weight(self, part: str, weight: float | None = None, reg_weight: float | None = None) -> None:
        """Change a part's weight (or regularisation weight) in place: nothing is rebuilt or recompiled."""
        if part not in self.config.names:
            raise ValueError(f"part must be one of {list(self.config.names)}, got {part!r}")
        i = self.config.names.index(part)
        weights, regs = list(self.config.weights), list(self.config.reg_weights)
        if weight is not None:
            weights[i] = _checks.real("weight", weight)
            self.part_table[i, 2] = weights[i]
        if reg_weight is not None:
            regs[i] = _checks.real("reg_weight", reg_weight)
            self.part_table[i, 3] = regs[i]
        self.config = dataclasses.replace(self.config, weights=tuple(weights), reg_weights=tuple(regs))
        self._plans.clear()

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, cond_frame: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key, run = self._cached(pred, target, cond_frame)
        if run is not None:
            return run(pred, target, cond_frame)
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor [B, L, D], got {type(pred).__name__}")
        table, dim_ws = _buffers_on(self, ("part_table", "dim_ws"), pred.device)
        run = functional.pva_plan(pred, target, cond_frame, self.config, part_table=table, dim_ws=dim_ws,
                                  backend=self.backend)
        return self._remember(key, run)(pred, target, cond_frame)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"parts={list(c.names)}, loss_type={c.loss_type!r}, use_last_frame_loss={c.use_last_frame}, "
            f"use_reg_loss={c.use_reg}, backend={self.backend!r}"
        )


class BlendshapeLoss(_FusedLoss):
    """KoeMorph's MSE + L1 + perceptual loss with the optional temporal, landmark, smoothing and
    consistency terms (SPEC §2), fused.

    ``forward(pred, target, raw_pred=None, prev_pred=None, return_components=False)`` returns
    ``total``, or ``(total, terms)`` with the computed terms (unweighted) and "total". Arguments
    as ``fusedloss.functional.blendshape_loss``.

    The weights and the threshold are attributes (``loss_fn.temporal_weight = 0.3``): assigning one
    updates a small settings buffer in place, so seed 001's stride and epoch schedules never
    rebuild or recompile anything (a weight going to or from 0 adds or drops its term). The
    buffers follow ``.to(device)``; a module left on the CPU moves them on its first call.
    """

    _SETTINGS = tuple(f"{t}_weight" for t in TERMS) + ("threshold",)
    _TABLES = ("settings", "group_coef", "landmark_gram")

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        config = BlendshapeConfig.build(mse_weight, l1_weight, perceptual_weight, temporal_weight, landmark_weight,
                                        smoothing_weight, consistency_weight, threshold, perceptual_groups)
        self.backend = _check_backend(backend)
        if landmark_matrix is not None:
            landmark_matrix = _checks.tensor("landmark_matrix", torch.as_tensor(landmark_matrix), rank=2,
                                             shape_doc="[J, K]").detach()
        elif config.weight("landmark") != 0:
            raise ValueError("landmark_matrix [J, K] is required when landmark_weight is non-zero")
        self.register_buffer("settings", config.settings(), persistent=False)
        self.register_buffer("group_coef", config.group_coef(), persistent=False)
        self.register_buffer("landmark_matrix", landmark_matrix, persistent=False)
        self.register_buffer("landmark_gram", None if landmark_matrix is None else landmark_gram(landmark_matrix),
                             persistent=False)
        self._config = config
        self._nonzero = tuple(w != 0 for w in config.weights)

    def __getattr__(self, name):
        if name in BlendshapeLoss._SETTINGS:
            config = self.__dict__["_config"]
            return config.threshold if name == "threshold" else config.weight(name[: -len("_weight")])
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in BlendshapeLoss._SETTINGS and "_config" in self.__dict__:
            self._set(name, value)
        else:
            super().__setattr__(name, value)

    def _set(self, name: str, value) -> None:
        """Change a weight or the threshold in place: the settings buffer, not a new tensor."""
        value = _checks.real(name, value)
        config = self._config
        if name == "threshold":
            config = dataclasses.replace(config, threshold=value)
        else:
            index = TERMS.index(name[: -len("_weight")])
            if index == TERMS.index("landmark") and value != 0 and self.landmark_matrix is None:
                raise ValueError("landmark_weight needs the landmark_matrix given at construction")
            weights = list(config.weights)
            weights[index] = value
            config = dataclasses.replace(config, weights=tuple(weights))
            nonzero = tuple(w != 0 for w in config.weights)
            if nonzero != self._nonzero:
                self.__dict__["_nonzero"] = nonzero
        self.settings[BlendshapeLoss._SETTINGS.index(name)] = value
        self.__dict__["_config"] = config
        self._plans.clear()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, raw_pred: torch.Tensor | None = None,
                prev_pred: torch.Tensor | None = None, return_components: bool = False):
        key, run = self._cached(pred, target, raw_pred, prev_pred)
        if run is not None:
            total, terms = run(pred, target, raw_pred, prev_pred)
            if return_components is False:
                return total
            return _with_total(total, terms, return_components)
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"pred must be a torch.Tensor [B, K] or [B, T, K], got {type(pred).__name__}")
        settings, group_coef, matrix, gram = _buffers_on(
            self, ("settings", "group_coef", "landmark_matrix", "landmark_gram"), pred.device)
        run = functional.blendshape_plan(
            pred, target, raw_pred, prev_pred, self._config, nonzero=self._nonzero, settings=settings,
            group_coef=group_coef, landmark_matrix=matrix, landmark_gram=gram, backend=self.backend,
        )
        total, terms = self._remember(key, run)(pred, target, raw_pred, prev_pred)
        return _with_total(total, terms, return_components)

    def extra_repr(self) -> str:
        c = self._config
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(TERMS, c.weights) if w)
        groups = f", perceptual_groups={len(c.groups)} groups" if c.groups else ""
        return f"{weights}, threshold={c.threshold}{groups}, backend={self.backend!r}"


def _with_total(total: torch.Tensor, terms, return_components):
    """``BlendshapeLoss``'s result: total, or (total, terms with "total") with return_components."""
    if not _checks.flag("return_components", return_components):
        return total
    out = dict(terms)
    out["total"] = total
    return total, out


class CombinedLoss(_FusedLoss):
    """TIGAS's regression + classification + all-pairs margin ranking loss (SPEC §3), fused.

    ``forward(scores [B] | [B, 1], logits [B, 2], labels [B] | [B, 1]) -> (total, terms)`` with
    ``terms`` = {"regression", "classification", "ranking", "total"}: 0-dim tensors. Arguments as
    ``fusedloss.functional.combined_loss``. The ranking term uses every (real, fake) pair of the
    batch, exactly, in O(B log B): a million scores need no |R| x |F| matrix.

    The weights and the margin are attributes (``loss_fn.ranking_weight = 0.5``): assigning one
    updates a small settings buffer in place, so nothing is rebuilt or recompiled.
    """

    _SETTINGS = tuple(f"{t}_weight" for t in score_ops.TERMS) + ("margin",)
    _TABLES = ("settings",)

    def __init__(
        self,
        regression_weight: float = 1.0,
        classification_weight: float = 0.3,
        ranking_weight: float = 0.2,
        regression_type: str = "mse",
        margin: float = 0.5,
        check_finite: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        config = score_ops.ScoreConfig.build(regression_weight, classification_weight, ranking_weight,
                                             regression_type, margin)
        self.check_finite = _checks.flag("check_finite", check_finite)
        self.backend = _check_backend(backend)
        self.register_buffer("settings", config.settings(), persistent=False)
        self._config = config

    @property
    def regression_type(self) -> str:
        return self._config.regression_type

    def __getattr__(self, name):
        if name in CombinedLoss._SETTINGS:
            config = self.__dict__["_config"]
            return config.margin if name == "margin" else config.weights[CombinedLoss._SETTINGS.index(name)]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        if name in CombinedLoss._SETTINGS and "_config" in self.__dict__:
            value = _checks.real(name, value)
            index = CombinedLoss._SETTINGS.index(name)
            config = self._config
            if name == "margin":
                config = dataclasses.replace(config, margin=value)
            else:
                weights = list(config.weights)
                weights[index] = value
                config = dataclasses.replace(config, weights=tuple(weights))
            self.settings[index] = value
            self.__dict__["_config"] = config
            self._plans.clear()
        elif name == "check_finite" and "_plans" in self.__dict__:
            super().__setattr__(name, _checks.flag("check_finite", value))
        else:
            super().__setattr__(name, value)

    def forward(self, scores: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key, run = self._cached(scores, logits, labels)
        if run is not None:
            return run(scores, logits, labels)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor [B] or [B, 1], got {type(scores).__name__}")
        (settings,) = _buffers_on(self, ("settings",), scores.device)
        run = functional.score_plan(scores, logits, labels, self._config, settings=settings,
                                    check_finite=self.check_finite, backend=self.backend)
        return self._remember(key, run)(scores, logits, labels)

    def extra_repr(self) -> str:
        c = self._config
        weights = ", ".join(f"{t}_weight={w}" for t, w in zip(score_ops.TERMS, c.weights))
        return (f"{weights}, regression_type={c.regression_type!r}, margin={c.margin}, "
                f"check_finite={self.check_finite}, backend={self.backend!r}")


class AllPairsMarginRankingLoss(_FusedLoss):
    """``max(0, margin - (s_i - s_j))`` over every pair of a real score s_i (label > 0.5) and a
    fake score s_j, averaged over the pairs (``"mean"``) or summed (``"sum"``): SPEC §3's ranking
    term alone, exact in O(B log B) time and O(B) memory.

    ``forward(scores [B] | [B, 1], labels [B] | [B, 1]) -> 0-dim tensor``.
    """

    _TABLES = ("settings",)

    def __init__(self, margin: float = 0.5, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self._config = score_ops.ScoreConfig.build(margin=margin, reduction=reduction)
        self.backend = _check_backend(backend)
        self.register_buffer("settings", self._config.settings(), persistent=False)

    @property
    def margin(self) -> float:
        return self._config.margin

    @margin.setter
    def margin(self, value) -> None:
        """Change the margin in place: nothing is rebuilt or recompiled."""
        value = _checks.real("margin", value)
        self.settings[score_ops.MARGIN] = value
        self._config = dataclasses.replace(self._config, margin=value)
        self._plans.clear()

    @property
    def reduction(self) -> str:
        return self._config.reduction

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        key, run = self._cached(scores, labels)
        if run is not None:
            return run(scores, None, labels)[0]
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor [B] or [B, 1], got {type(scores).__name__}")
        (settings,) = _buffers_on(self, ("settings",), scores.device)
        run = functional.score_plan(scores, None, labels, self._config, settings=settings,
                                    terms=score_ops.RANKING_ONLY, backend=self.backend)
        return self._remember(key, run)(scores, None, labels)[0]

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, backend={self.backend!r}"
