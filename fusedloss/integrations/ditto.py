"""Ditto's training code (its MotionDiT, e.g. ``wangjia184/ditto-talkinghead``), fused.

Ditto computes its PVA loss in ``MotionDiffusion.p_losses(x_start, cond_frame, cond, t)``: it draws
the noise, noises ``x_start``, runs the denoiser, and hands the prediction and the target (``x_start``,
or the noise with ``predict_epsilon``) to a nested ``_get_pva_loss(pred, gt, part_w_dict,
use_last_frame_loss, use_reg_loss, dim_ws)``, which reads ``cond_frame`` from the enclosing call.
It returns ``(sum(loss_dict.values()), loss_dict)``, where ``loss_dict`` holds ``f"{part}_P"``,
``_V`` and ``_A``, then ``_L`` and ``_R`` when enabled, for every part. Its trainer backpropagates
the sum, adds ``loss_dict["total_loss"] = loss``, and logs ``float(v)`` of every value.
``fusedloss.PVALoss`` computes exactly that loss (docs/losses.md §1). This module adds Ditto's
call forms:

  ``pva_loss_dict(pred, gt, part_w_dict, use_last_frame_loss, use_reg_loss, dim_ws, cond_frame=...)``
      ``_get_pva_loss`` as a function: the loss dict, with ``cond_frame`` passed explicitly
  ``loss_from_options(opt)``
      ``PVALoss`` from Ditto's ``TrainOptions`` fields (``part_w_dict_json``, ``dim_ws_npy``,
      ``use_last_frame_loss``, ``use_reg_loss``), as its trainer builds ``MotionDiffusion``
  ``apply(MotionDiffusion, backend="auto")``
      replaces the class's ``p_losses`` with one that makes the same calls (the same noise draw,
      so the same random stream) and computes the loss fused, from the diffusion's settings as
      they are at each call (``part_w_dict``, ``use_last_frame_loss``, ``use_reg_loss``,
      ``dim_ws``, ``loss_fn``); ``apply()`` again replaces the patch; ``revert(MotionDiffusion)``
      undoes it.
What differs on purpose: the dict is our lazy terms mapping (``dict(loss_dict)`` makes a plain
one; item assignment and ``float(v)`` work as on a dict), and the fused backends treat ``dim_ws``
as a constant (Ditto keeps it in a buffer, so it never gets a gradient there either).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from ..pva.functional import pva_loss
from ..pva.module import PVALoss

# Ditto's defaults when no part_w_dict is given (D = 265): the six parts, each with weight 1.
DEFAULT_PART_W_DICT = {"scale": [0, 1, 1], "pitch": [1, 67, 1], "yaw": [67, 133, 1], "roll": [133, 199, 1],
                       "t": [199, 202, 1], "exp": [202, 265, 1]}


def pva_loss_dict(pred: torch.Tensor, gt: torch.Tensor, part_w_dict, use_last_frame_loss: bool = False,
                  use_reg_loss: bool = False, dim_ws=None, *, cond_frame: torch.Tensor | None = None,
                  loss_type: str = "l2", backend: str = "auto"):
    """Ditto's ``_get_pva_loss``: ``{f"{part}_{P|V|A|L|R}": 0-dim tensor}`` (``cond_frame`` [B, D]
    needed with ``use_last_frame_loss``; ``loss_type`` "l2" is MSE, as Ditto's LMDM trains)."""
    if dim_ws is not None:
        dim_ws = torch.as_tensor(_constant(dim_ws), device=pred.device)
    return pva_loss(pred, gt, cond_frame, part_w_dict, use_last_frame_loss, use_reg_loss, dim_ws, loss_type,
                    backend=backend)[1]


def loss_from_options(opt, *, loss_type: str = "l2", backend: str = "auto") -> PVALoss:
    """``PVALoss`` from Ditto's ``TrainOptions`` (``part_w_dict_json``: a JSON file of
    ``{part: [start, end, weight]}``, "" for Ditto's six parts; ``dim_ws_npy``: a ``.npy`` of D
    weights, "" for none; ``use_last_frame_loss``; ``use_reg_loss``)."""
    part_w_dict = DEFAULT_PART_W_DICT
    if getattr(opt, "part_w_dict_json", ""):
        with open(opt.part_w_dict_json) as f:
            part_w_dict = json.load(f)
    dim_ws = None
    if getattr(opt, "dim_ws_npy", ""):
        import numpy as np

        dim_ws = torch.from_numpy(np.load(opt.dim_ws_npy))
    return PVALoss(part_w_dict, bool(getattr(opt, "use_last_frame_loss", False)),
                   bool(getattr(opt, "use_reg_loss", False)), dim_ws=dim_ws, loss_type=loss_type, backend=backend)


def _constant(dim_ws):
    return dim_ws.detach() if isinstance(dim_ws, torch.Tensor) else dim_ws


def _loss_type(diffusion) -> str:
    """Ditto picks ``self.loss_fn = F.mse_loss if loss_type == "l2" else F.l1_loss``."""
    return "l1" if getattr(diffusion, "loss_fn", F.mse_loss) is F.l1_loss else "l2"


def _settings(diffusion, backend: str) -> tuple:
    """What the diffusion's PVA loss is made from, as it is now: its ``part_w_dict`` (by value: a
    dict changed in place counts), flags, ``dim_ws`` (by identity and version counter), loss type
    and the backend ``apply()`` was given."""
    part_w_dict = diffusion.part_w_dict
    if not part_w_dict:
        raise NotImplementedError("Ditto's p_losses needs a part_w_dict (as its own code does)")
    dim_ws = getattr(diffusion, "dim_ws", None)
    dim_ws_key = None if dim_ws is None else (id(dim_ws), getattr(dim_ws, "_version", None))
    parts = tuple((name, tuple(spec) if isinstance(spec, (list, tuple)) else spec) for name, spec in part_w_dict.items())
    return (parts, bool(diffusion.use_last_frame_loss), bool(diffusion.use_reg_loss), dim_ws_key, _loss_type(diffusion),
            backend)


def _fused_loss(diffusion, backend: str) -> PVALoss:
    """The diffusion's PVALoss for its current settings: kept on it, and made again whenever one of
    them changed since (so an assignment between steps takes effect, as in Ditto's own code)."""
    key = _settings(diffusion, backend)
    kept = diffusion.__dict__.get("_fused_pva_loss")
    if kept is None or kept[0] != key:
        loss_fn = PVALoss(diffusion.part_w_dict, bool(diffusion.use_last_frame_loss), bool(diffusion.use_reg_loss),
                          dim_ws=_constant(getattr(diffusion, "dim_ws", None)), loss_type=key[4], backend=backend)
        # (not a submodule: the state dict stays Ditto's; dim_ws is kept so that its id is not reused)
        kept = diffusion.__dict__["_fused_pva_loss"] = (key, loss_fn, getattr(diffusion, "dim_ws", None))
    return kept[1]


def apply(diffusion_class, backend: str = "auto") -> None:
    """Make ``diffusion_class`` (Ditto's ``MotionDiffusion``) compute its PVA loss fused. Calling it
    again on a patched class replaces the patch (e.g. with another backend)."""
    from ..core.module import check_backend

    check_backend(backend)
    original = diffusion_class.__dict__.get("_fusedloss_original_p_losses", diffusion_class.p_losses)

    def p_losses(self, x_start, cond_frame, cond, t):
        noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        pred = self.model(x_noisy, cond_frame, cond, t, cond_drop_prob=self.cond_drop_prob)
        target = noise if self.predict_epsilon else x_start
        return _fused_loss(self, backend)(pred, target, cond_frame)

    p_losses.__doc__ = "Ditto's p_losses with the PVA loss fused (fusedloss.integrations.ditto)."
    diffusion_class._fusedloss_original_p_losses = original
    diffusion_class.p_losses = p_losses


def revert(diffusion_class) -> None:
    original = diffusion_class.__dict__.get("_fusedloss_original_p_losses")
    if original is not None:
        diffusion_class.p_losses = original
        del diffusion_class._fusedloss_original_p_losses
