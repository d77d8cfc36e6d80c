"""fusedloss.integrations.ditto against Ditto's loss as its training code defines it.

Ditto is not a package, so ``DittoLikeDiffusion`` below restates, in plain PyTorch, what its
``MotionDiffusion.p_losses`` and nested ``_get_pva_loss`` compute (read from
wangjia184/ditto-talkinghead, MotionDiT/src/models/modules/diffusion.py): per part ``[s, e, w]``
(``s <= 0`` -> 0, ``e <= 0`` -> D), elementwise loss times ``w * dim_ws[s:e]``, means of the
position, velocity and acceleration errors, the first predicted frame against ``cond_frame``, and
``mean |pred| * (0 for "scale", else 1e-4)``; the total is the sum of the dict.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedloss.integrations import ditto

PARTS = {"scale": [0, 1, 1.0], "pose": [1, 4, 0.5], "exp": [3, -1, 2.0], "all": [0, 0, 0.25]}


def ditto_pva_loss(pred, gt, cond_frame, part_w_dict, use_last_frame_loss, use_reg_loss, dim_ws, loss_fn):
    out = {}
    for name, (s, e, w) in part_w_dict.items():
        s, e = max(s, 0), e if e > 0 else gt.shape[-1]
        weight = w if dim_ws is None else dim_ws[s:e][None, None] * w
        p, g = pred[..., s:e], gt[..., s:e]
        vp, vg = p[:, 1:] - p[:, :-1], g[:, 1:] - g[:, :-1]
        ap, ag = vp[:, 1:] - vp[:, :-1], vg[:, 1:] - vg[:, :-1]
        out[f"{name}_P"] = (loss_fn(p, g, reduction="none") * weight).mean()
        out[f"{name}_V"] = (loss_fn(vp, vg, reduction="none") * weight).mean()
        out[f"{name}_A"] = (loss_fn(ap, ag, reduction="none") * weight).mean()
        if use_last_frame_loss:
            out[f"{name}_L"] = (loss_fn(p[:, 0:1], cond_frame[..., s:e][:, None], reduction="none") * weight).mean()
        if use_reg_loss:
            out[f"{name}_R"] = p.abs().mean() * (0 if name == "scale" else 1e-4)
    return out


class DittoLikeDiffusion(nn.Module):
    """The attributes and calls of Ditto's MotionDiffusion that p_losses uses."""

    def __init__(self, D, part_w_dict, use_last_frame_loss, use_reg_loss, dim_ws, loss_type, predict_epsilon):
        super().__init__()
        self.model_net = nn.Linear(D, D)
        self.part_w_dict, self.use_last_frame_loss, self.use_reg_loss = part_w_dict, use_last_frame_loss, use_reg_loss
        self.register_buffer("dim_ws", dim_ws)
        self.loss_fn = F.mse_loss if loss_type == "l2" else F.l1_loss
        self.predict_epsilon, self.cond_drop_prob = predict_epsilon, 0.2

    def q_sample(self, x_start, t, noise):
        a = (1 - t.float() / 1000)[:, None, None]
        return a.sqrt() * x_start + (1 - a).sqrt() * noise

    def model(self, x, cond_frame, cond, t, cond_drop_prob):
        return self.model_net(x) + cond_frame[:, None] * 0.1 + cond

    def p_losses(self, x_start, cond_frame, cond, t):
        noise = torch.randn_like(x_start)
        pred = self.model(self.q_sample(x_start=x_start, t=t, noise=noise), cond_frame, cond, t, self.cond_drop_prob)
        target = noise if self.predict_epsilon else x_start
        loss_dict = ditto_pva_loss(pred, target, cond_frame, self.part_w_dict, self.use_last_frame_loss,
                                   self.use_reg_loss, self.dim_ws, self.loss_fn)
        return sum(loss_dict.values()), loss_dict


@pytest.mark.parametrize("loss_type, last, reg, epsilon, weighted", [
    ("l2", True, False, False, True), ("l1", True, True, True, False), ("l2", False, True, False, True)])
def test_patched_p_losses_matches_ditto(loss_type, last, reg, epsilon, weighted):
    D = 7
    g = torch.Generator().manual_seed(0)
    dim_ws = torch.rand(D, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    x, cond_frame, cond = torch.randn(3, 6, D, generator=g), torch.randn(3, D, generator=g), torch.randn(3, 6, D, generator=g)
    t = torch.tensor([10, 500, 990])
    diffusion = DittoLikeDiffusion(D, PARTS, last, reg, dim_ws, loss_type, epsilon)
    results = []
    for patched in (False, True):
        if patched:
            ditto.apply(DittoLikeDiffusion, backend="cpu")
        try:
            torch.manual_seed(5)   # the same noise draw
            diffusion.zero_grad()
            loss, loss_dict = diffusion.p_losses(x, cond_frame, cond, t)
            assert torch.allclose(loss, sum(loss_dict.values()))
            (loss * 1.5).backward()
            loss_dict["total_loss"] = loss   # as Ditto's trainer does before logging float(v)
            results.append(({k: float(v.detach()) for k, v in loss_dict.items()}, diffusion.model_net.weight.grad.clone()))
        finally:
            ditto.revert(DittoLikeDiffusion)
    (expected, expected_grad), (got, grad) = results
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # (float32 sums in another order; Ditto's float64 dim_ws promotes its products to float64)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))
    assert DittoLikeDiffusion.p_losses.__doc__ is None   # reverted
    assert set(diffusion.state_dict()) == {"model_net.weight", "model_net.bias"} | ({"dim_ws"} if weighted else set())


def test_pva_loss_dict_is_get_pva_loss():
    g = torch.Generator().manual_seed(1)
    pred, gt, cond = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g), torch.randn(2, 9, generator=g)
    dim_ws = torch.linspace(0.5, 1.5, 9)
    got = ditto.pva_loss_dict(pred, gt, PARTS, True, True, dim_ws, cond_frame=cond, backend="cpu")
    expected = ditto_pva_loss(pred, gt, cond, PARTS, True, True, dim_ws, F.mse_loss)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


def test_loss_from_options_reads_ditto_files(tmp_path):
    (tmp_path / "parts.json").write_text(json.dumps(PARTS))
    np.save(tmp_path / "dim_ws.npy", np.linspace(0.5, 1.5, 9))

    class Options:   # Ditto's TrainOptions fields
        part_w_dict_json = str(tmp_path / "parts.json")
        dim_ws_npy = str(tmp_path / "dim_ws.npy")
        use_last_frame_loss = True
        use_reg_loss = False

    loss_fn = ditto.loss_from_options(Options(), backend="cpu")
    g = torch.Generator().manual_seed(2)
    pred, gt, cond = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g), torch.randn(2, 9, generator=g)
    total, terms = loss_fn(pred, gt, cond)
    expected = ditto_pva_loss(pred, gt, cond, PARTS, True, False, torch.from_numpy(np.linspace(0.5, 1.5, 9)),
                              F.mse_loss)
    torch.testing.assert_close(total, sum(expected.values()).float(), rtol=1e-5, atol=1e-7)

    class Defaults:
        part_w_dict_json = dim_ws_npy = ""

    assert list(ditto.loss_from_options(Defaults()).config.names) == list(ditto.DEFAULT_PART_W_DICT)


def test_patched_p_losses_reads_the_current_settings():
    """Settings changed on the diffusion object between steps (a part's weight in place, new parts,
    the flags, the criterion, dim_ws in place) take effect as in Ditto's own p_losses."""
    D = 7
    g = torch.Generator().manual_seed(3)
    x, cond_frame, cond = torch.randn(3, 6, D, generator=g), torch.randn(3, D, generator=g), torch.randn(3, 6, D, generator=g)
    t = torch.tensor([10, 500, 990])
    parts = {name: list(spec) for name, spec in PARTS.items()}
    diffusion = DittoLikeDiffusion(D, parts, False, False, torch.rand(D, generator=g, dtype=torch.float64) + 0.5,
                                   "l2", False)

    def changes():
        yield "as built"
        diffusion.part_w_dict["pose"][2] = 3.0          # in place, as a schedule would
        yield "a part weight in place"
        diffusion.part_w_dict = {"a": [0, 3, 1.0], "b": [2, 0, 0.5]}
        yield "other parts"
        diffusion.use_last_frame_loss, diffusion.use_reg_loss = True, True
        yield "the flags"
        diffusion.loss_fn = F.l1_loss
        yield "the criterion"
        with torch.no_grad():
            diffusion.dim_ws.mul_(2)
        yield "dim_ws in place"

    for change in changes():
        expected = []
        for patched in (False, True):
            if patched:
                ditto.apply(DittoLikeDiffusion, backend="cpu")
            try:
                torch.manual_seed(5)
                loss, loss_dict = diffusion.p_losses(x, cond_frame, cond, t)
                expected.append({k: float(v.detach()) for k, v in loss_dict.items()})
            finally:
                ditto.revert(DittoLikeDiffusion)
        assert list(expected[1]) == list(expected[0]), change
        for key, value in expected[0].items():
            assert expected[1][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (change, key)


def test_apply_again_takes_effect():
    D = 7
    diffusion = DittoLikeDiffusion(D, PARTS, True, False, None, "l2", False)
    args = (torch.randn(2, 6, D), torch.randn(2, D), torch.randn(2, 6, D), torch.tensor([1, 2]))
    original = DittoLikeDiffusion.p_losses
    try:
        ditto.apply(DittoLikeDiffusion, backend="cpu")
        diffusion.p_losses(*args)
        assert diffusion.__dict__["_fused_pva_loss"][1].backend == "cpu"
        ditto.apply(DittoLikeDiffusion, backend="reference")   # replaces the patch
        diffusion.p_losses(*args)
        assert diffusion.__dict__["_fused_pva_loss"][1].backend == "reference"
        with pytest.raises(ValueError, match="backend"):
            ditto.apply(DittoLikeDiffusion, backend="gpu")
    finally:
        ditto.revert(DittoLikeDiffusion)
    assert DittoLikeDiffusion.p_losses is original   # one revert undoes every apply
