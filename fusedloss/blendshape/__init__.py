"""KoeMorph's MSE + L1 + perceptual (+ temporal, landmark, smoothing, consistency) loss
(docs/losses.md §2).

  config.py      BlendshapeConfig, input validation, the computed terms, the tables
  layout.py      settings slots, term bits, sums, limits (C++ twin: csrc/blendshape/blendshape_math.h)
  reference.py   the loss in plain PyTorch: the oracle and the "reference" backend
  fake.py        the operators' fake implementations (schemas: csrc/blendshape/blendshape.cpp)
  triton.py      the Triton kernels and operators, and their autograd
  functional.py  blendshape_loss, and blendshape_plan: a call's route to its operator
  distributed.py the loss over a process group
  module.py      BlendshapeLoss: its configuration and tables
"""

from .config import DUAL_STREAM_GROUPS, BlendshapeConfig
from .functional import blendshape_loss, blendshape_loss_from_config, blendshape_plan
from .module import BlendshapeLoss

__all__ = ["BlendshapeLoss", "blendshape_loss", "blendshape_loss_from_config", "blendshape_plan",
           "BlendshapeConfig", "DUAL_STREAM_GROUPS"]
