"""Ditto's per-part position / velocity / acceleration loss (docs/losses.md §1).

  config.py      PVAConfig (the validated constructor arguments), input validation
  layout.py      the part table's columns and the term order (C++ twin: csrc/pva/pva_math.h)
  reference.py   the loss in plain PyTorch: the oracle and the "reference" backend
  fake.py        the operators' fake implementations (schemas: csrc/pva/pva.cpp)
  triton.py      the Triton kernels and operators, and their autograd
  functional.py  pva_loss, and pva_plan: a call's route to its operator
  module.py      PVALoss: its configuration and tables
"""

from .config import DITTO_PARTS, PVAConfig
from .functional import pva_loss, pva_loss_from_config, pva_plan
from .module import PVALoss

__all__ = ["PVALoss", "pva_loss", "pva_loss_from_config", "pva_plan", "PVAConfig", "DITTO_PARTS"]
