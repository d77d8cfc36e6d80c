"""Functional entry points: validate -> choose the backend -> call its operator.

Each function takes the same arguments as its module's constructor, plus the tensors, and
``backend="auto" | "triton" | "cuda" | "cpu" | "reference"`` (see ``fusedloss.backends``). They
live with their families (``fusedloss/<family>/functional.py``); this module gathers them.
The contract of each loss: docs/losses.md.
"""

# (The *_from_config and *_plan forms take a validated configuration: what the modules call.)
from .blendshape.functional import (  # noqa: F401
    blendshape_loss,
    blendshape_loss_from_config,
    blendshape_plan,
)
from .pva.functional import pva_loss, pva_loss_from_config, pva_plan  # noqa: F401
from .score.functional import (  # noqa: F401
    all_pairs_margin_ranking_loss,
    combined_loss,
    score_loss_from_config,
    score_plan,
)

__all__ = ["pva_loss", "blendshape_loss", "combined_loss", "all_pairs_margin_ranking_loss"]
