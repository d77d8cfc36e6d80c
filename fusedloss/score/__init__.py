"""TIGAS's regression + classification + all-pairs margin ranking loss (docs/losses.md §3).

  config.py      ScoreConfig, input validation
  layout.py      settings slots, term bits, status bits, the all-pairs limits (C++ twin: csrc/score/score_math.h)
  reference.py   the losses in plain PyTorch: the oracle and the "reference" backend
  fake.py        the operators' fake implementations (schemas: csrc/score/score.cpp)
  finite.py      the finiteness check (check_finite), an operator
  triton.py      the Triton kernels and operators, and their autograd
  functional.py  combined_loss, all_pairs_margin_ranking_loss, and score_plan: a call's route to its operator
  module.py      CombinedLoss, AllPairsMarginRankingLoss: their configuration and tables
"""

from .config import ScoreConfig
from .functional import (
           all_pairs_margin_ranking_loss,
           combined_loss,
           score_loss_from_config,
           score_plan,
)
from .module import AllPairsMarginRankingLoss, CombinedLoss

__all__ = ["CombinedLoss", "AllPairsMarginRankingLoss", "combined_loss", "all_pairs_margin_ranking_loss",
           "score_loss_from_config", "score_plan", "ScoreConfig"]
