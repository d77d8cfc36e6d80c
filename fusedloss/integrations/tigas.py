"""The published TIGAS package's loss (``tigas-metric`` 0.2.1, ``tigas.training.losses.TIGASLoss``), fused.

``TIGASLoss`` takes the package's constructor and call form::

    loss_fn = TIGASLoss(regression_weight=1.0, classification_weight=0.5, ranking_weight=0.3,
                        use_smooth_l1=True, margin=0.5, max_ranking_pairs=64, pairs="all")
    losses = loss_fn({"score": scores [B, 1], "logits": logits [B, 2]}, labels [B, 1])
    losses["total"].backward()      # also "regression", "classification", "ranking": 0-dim tensors

and ``apply()`` patches the package so that its ``CombinedLoss`` (the default loss of
``TIGASTrainer``) builds ours. How the package's loss is defined:
  regression      SmoothL1Loss (beta 1) or MSELoss of scores against labels
  classification  CrossEntropyLoss of logits against ``labels.squeeze(1).long()``
  ranking         MarginRankingLoss(margin) over at most ``max_ranking_pairs`` pairs of a real score
                  (label exactly 1) and a fake one (label exactly 0), drawn with a CPU generator
                  seeded ``42 + calls so far`` (the ``_iteration`` buffer): ``min(max_ranking_pairs,
                  n_real * n_fake, n_real, n_fake)`` real indices, then as many fake indices
  total           regression_weight * regression + classification_weight * classification
                  + ranking_weight * ranking
``pairs`` chooses the ranking:
  "all"      (the default) every real x fake pair, exact, fused with the other two terms in one
             kernel pair (docs/losses.md §3), with no host synchronisation but ``check_finite``'s.
             Real means label > 0.5 and fake the rest, and the class is label > 0.5, which is the
             package's rule for labels 0 and 1, the labels it trains on.
  "sampled"  the package's pairs, drawn as it draws them (so the same calls give the same
             numbers, and the same ``_iteration``), with the host syncs that drawing needs;
             regression and classification stay fused. Labels other than 0 and 1 (where the
             package's classes and sets differ from "all") are handled as the package does.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ..core import checks
from ..core.module import Backend
from ..score.module import CombinedLoss

PAIRS = ("all", "sampled")


def _check_sampled(pairs: str, process_group) -> None:
    if pairs == "sampled" and process_group is not None:
        raise ValueError("pairs='sampled' draws the package's pairs from one process's batch; "
                         "use pairs='all' with a process_group")


class TIGASLoss(nn.Module):
    """``tigas.training.losses.TIGASLoss`` (tigas-metric 0.2.1), fused; see the module docstring.

    ``forward(outputs, labels, model=None)``: ``outputs`` holds ``"score"`` ``[B, 1]`` and
    ``"logits"`` ``[B, 2]``; ``labels`` ``[B, 1]``. ``model`` is accepted and ignored, so that the
    module can also be handed to ``TIGASTrainer(loss_fn=...)``, which passes its model. Returns
    ``{"total", "regression", "classification", "ranking"}``.

    Every constructor argument is an attribute that can be assigned between calls, as are the
    package's ``regression_loss`` (an ``nn.SmoothL1Loss()`` or ``nn.MSELoss()``) and
    ``classification_loss``. The state dict is the package's (``_iteration``): the fused
    ``CombinedLoss`` (``fused``) is held outside it.
    """

    def __init__(
        self,
        regression_weight: float = 1.0,
        classification_weight: float = 0.5,
        ranking_weight: float = 0.3,
        use_smooth_l1: bool = True,
        margin: float = 0.5,
        max_ranking_pairs: int = 64,
        *,
        pairs: Literal["all", "sampled"] = "all",
        check_finite: bool = True,
        backend: Backend = "auto",
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        # "sampled": the fused kernels give regression and classification; the ranking is drawn here.
        fused = CombinedLoss(regression_weight, classification_weight, ranking_weight,
                             regression_type="smoothl1" if checks.flag("use_smooth_l1", use_smooth_l1) else "mse",
                             margin=margin, check_finite=check_finite, backend=backend)
        self.__dict__.update(fused=fused, _ranking_weight=fused.ranking_weight, _pairs="all")
        self.max_ranking_pairs = max_ranking_pairs
        self.pairs = pairs
        self.process_group = process_group
        # The package's call counter (its state_dict key), which seeds the sampled pairs.
        self.register_buffer("_iteration", torch.tensor(0, dtype=torch.long))

    # The package's attributes, assignable between steps: the fused module's settings.
    @property
    def regression_weight(self) -> float:
        return self.fused.regression_weight

    @regression_weight.setter
    def regression_weight(self, value: float) -> None:
        self.fused.regression_weight = value

    @property
    def classification_weight(self) -> float:
        return self.fused.classification_weight

    @classification_weight.setter
    def classification_weight(self, value: float) -> None:
        self.fused.classification_weight = value

    @property
    def ranking_weight(self) -> float:
        return self.__dict__["_ranking_weight"]

    @ranking_weight.setter
    def ranking_weight(self, value: float) -> None:
        self.__dict__["_ranking_weight"] = checks.real("ranking_weight", value)
        self._sync_ranking()

    @property
    def margin(self) -> float:
        return self.fused.margin

    @margin.setter
    def margin(self, value: float) -> None:
        self.fused.margin = value

    @property
    def use_smooth_l1(self) -> bool:
        """Smooth L1 (beta 1) regression, else MSE; the package chooses ``regression_loss`` by it."""
        return self.fused.regression_type == "smoothl1"

    @use_smooth_l1.setter
    def use_smooth_l1(self, value: bool) -> None:
        self.fused.regression_type = "smoothl1" if checks.flag("use_smooth_l1", value) else "mse"

    @property
    def regression_loss(self) -> nn.Module:
        """The package's regression criterion (read from ``use_smooth_l1``; assignable as
        ``nn.SmoothL1Loss()`` or ``nn.MSELoss()``, with their default reduction and beta)."""
        return nn.SmoothL1Loss() if self.use_smooth_l1 else nn.MSELoss()

    @property
    def classification_loss(self) -> nn.Module:
        """The package's classification criterion: ``nn.CrossEntropyLoss()``."""
        return nn.CrossEntropyLoss()

    @property
    def max_ranking_pairs(self) -> int:
        return self.__dict__["_max_ranking_pairs"]

    @max_ranking_pairs.setter
    def max_ranking_pairs(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_ranking_pairs must be a non-negative integer, got {value!r}")
        self.__dict__["_max_ranking_pairs"] = value

    @property
    def pairs(self) -> str:
        """"all" (every real x fake pair, fused) or "sampled" (the package's pairs)."""
        return self.__dict__["_pairs"]

    @pairs.setter
    def pairs(self, value: str) -> None:
        if value not in PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(map(repr, PAIRS))}, got {value!r}")
        _check_sampled(value, self.fused.process_group)
        self.__dict__["_pairs"] = value
        self._sync_ranking()

    @property
    def check_finite(self) -> bool:
        return self.fused.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.fused.check_finite = value

    @property
    def backend(self) -> str:
        return self.fused.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.fused.backend = value

    @property
    def process_group(self):
        return self.fused.process_group

    @process_group.setter
    def process_group(self, value) -> None:
        _check_sampled(self.pairs, value)
        self.fused.process_group = value

    def _sync_ranking(self) -> None:
        """The fused ranking weight: the ranking's with every pair, 0 when the pairs are sampled here."""
        self.fused.ranking_weight = self.ranking_weight if self.pairs == "all" else 0.0

    def __setattr__(self, name, value) -> None:
        if name == "regression_loss":   # (nn.Module would keep a module as a submodule, unread)
            if type(value) is nn.SmoothL1Loss and value.beta == 1.0 and value.reduction == "mean":
                self.use_smooth_l1 = True
            elif type(value) is nn.MSELoss and value.reduction == "mean":
                self.use_smooth_l1 = False
            else:
                raise ValueError(f"regression_loss must be nn.SmoothL1Loss() or nn.MSELoss() (mean), got {value!r}")
            return
        if name == "classification_loss":
            if (type(value) is not nn.CrossEntropyLoss or value.weight is not None or value.label_smoothing != 0
                    or value.ignore_index != -100 or value.reduction != "mean"):
                raise ValueError(f"classification_loss must be nn.CrossEntropyLoss() (its defaults), got {value!r}")
            return
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.fused._apply(fn, recurse)   # (held outside the module tree, so that the state dict is the package's)
        return out

    def forward(self, outputs, labels: torch.Tensor, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        scores, logits = outputs["score"], outputs["logits"]
        if self.pairs == "all":
            total, terms = self.fused(scores, logits, labels)
            return {"total": total, "regression": terms["regression"], "classification": terms["classification"],
                    "ranking": terms["ranking"]}
        return self._sampled(scores, logits, labels)

    def _sampled(self, scores, logits, labels):
        binary = bool(((labels == 0) | (labels == 1)).all())   # (a host sync, as the package makes many)
        if binary:
            _, terms = self.fused(scores, logits, labels)
            regression, classification = terms["regression"], terms["classification"]
        else:  # the package's classes (truncated labels), which the fused kernel does not form
            regression = (F.smooth_l1_loss if self.use_smooth_l1 else F.mse_loss)(scores, labels.to(scores.dtype))
            classification = F.cross_entropy(logits, labels.squeeze(1).long())
        ranking = self._sampled_ranking(scores, labels)
        total = (self.regression_weight * regression + self.classification_weight * classification
                 + self.ranking_weight * ranking)
        return {"total": total, "regression": regression, "classification": classification, "ranking": ranking}

    def _sampled_ranking(self, scores, labels):
        """The package's ``_compute_ranking_loss`` on the same pairs (see the module docstring)."""
        real_mask, fake_mask = (labels == 1.0).squeeze(1), (labels == 0.0).squeeze(1)
        if not (real_mask.any() and fake_mask.any()):
            return torch.zeros((), device=scores.device, dtype=scores.dtype)
        real, fake = scores[real_mask], scores[fake_mask]
        n_real, n_fake = len(real), len(fake)
        count = min(self.max_ranking_pairs, n_real * n_fake, n_real, n_fake)
        if count == 0:
            return torch.zeros((), device=scores.device, dtype=scores.dtype)
        generator = torch.Generator()
        generator.manual_seed(42 + int(self._iteration))
        real_index = torch.randint(0, n_real, (count,), generator=generator).to(scores.device)
        fake_index = torch.randint(0, n_fake, (count,), generator=generator).to(scores.device)
        self._iteration += 1
        target = torch.ones(count, device=scores.device)
        return F.margin_ranking_loss(real[real_index].squeeze(1), fake[fake_index].squeeze(1), target,
                                     margin=self.margin)

    def extra_repr(self) -> str:
        return f"pairs={self.pairs!r}, max_ranking_pairs={self.max_ranking_pairs}, fused={self.fused.backend!r}"


def import_training():
    """``tigas.training`` of the installed package, importable without torchvision.

    The package's top-level ``tigas/__init__.py`` imports its inference API, which needs
    torchvision (one of the dependencies it declares, with OpenCV and scikit-learn, that its
    training code never uses). When ``tigas`` is not imported yet, it is registered as a bare
    package over the installed folder, so that ``import tigas.training`` runs only
    ``tigas/training`` and ``tigas/models``. Raises ``ModuleNotFoundError`` without the package."""
    import importlib.util
    import sys
    import types

    if "tigas" not in sys.modules:
        spec = importlib.util.find_spec("tigas")
        if spec is None:
            raise ModuleNotFoundError("tigas-metric is not installed: pip install --no-deps tigas-metric==0.2.1")
        package = types.ModuleType("tigas")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["tigas"] = package
    return importlib.import_module("tigas.training")


_ORIGINAL: dict = {}


def apply(pairs: str = "all", backend: str = "auto") -> None:
    """Patch the installed TIGAS package (Liger-style): ``tigas.training.losses.TIGASLoss`` and
    ``tigas.training.TIGASLoss`` become ours with these defaults, so its ``CombinedLoss`` (and so
    ``TIGASTrainer``'s default loss) builds the fused loss. Call it before building the loss;
    ``revert()`` undoes it."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {', '.join(map(repr, PAIRS))}, got {pairs!r}")
    losses = importlib.import_module("tigas.training.losses")
    training = importlib.import_module("tigas.training")
    _ORIGINAL.setdefault("TIGASLoss", losses.TIGASLoss)

    class PatchedTIGASLoss(TIGASLoss):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{"pairs": pairs, "backend": backend, **kwargs})

    PatchedTIGASLoss.__name__ = PatchedTIGASLoss.__qualname__ = "TIGASLoss"
    losses.TIGASLoss = training.TIGASLoss = PatchedTIGASLoss


def revert() -> None:
    """Undo ``apply()``: the package's own ``TIGASLoss`` again."""
    if "TIGASLoss" in _ORIGINAL:
        losses = importlib.import_module("tigas.training.losses")
        training = importlib.import_module("tigas.training")
        losses.TIGASLoss = training.TIGASLoss = _ORIGINAL.pop("TIGASLoss")
