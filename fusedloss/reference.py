"""The oracles of every family in one import: each family's ``reference.py``, the losses of
docs/losses.md in plain PyTorch (what the ``"reference"`` backend runs and the tests compare with)."""

from .blendshape.reference import blendshape_loss_reference
from .pva.reference import pva_loss_reference
from .score.reference import all_pairs_margin_ranking_reference, score_loss_reference

__all__ = ["pva_loss_reference", "blendshape_loss_reference", "score_loss_reference",
           "all_pairs_margin_ranking_reference"]
