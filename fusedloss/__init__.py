"""fusedloss: fused loss kernels for PyTorch training (Triton, CUDA, C++ CPU).

    from fusedloss import PVALoss
    loss_fn = PVALoss(use_last_frame_loss=True)
    total, terms = loss_fn(pred, target, cond_frame)
"""

from . import backends, functional
from .backends import BackendUnavailableError
from .blendshape import BlendshapeLoss
from .pva import PVALoss
from .score import AllPairsMarginRankingLoss, CombinedLoss

__version__ = "0.1.0"

__all__ = ["PVALoss", "BlendshapeLoss", "CombinedLoss", "AllPairsMarginRankingLoss", "functional", "backends", "BackendUnavailableError", "__version__"]
