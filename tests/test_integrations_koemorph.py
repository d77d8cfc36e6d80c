"""fusedloss.integrations.koemorph against KoeMorph's loss as its repository defines it.

KoeMorph is not a package, so ``koemorph_loss`` below restates, in plain PyTorch, what its
``src/model/losses.py`` ``KoeMorphLoss`` computes (see the adapter's docstring for the terms), and
``RepositoryKoeMorphLoss`` restates the module: its attributes, its submodules, its landmark
parameter drawn from the global random stream when built, and so its state dict.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedloss.integrations import koemorph

TERMS = ("mse", "l1", "perceptual", "temporal", "sparsity", "smoothness", "landmark", "velocity")


def weights_of(loss_fn) -> dict:
    return {t: getattr(loss_fn, f"{t}_weight") for t in TERMS}


def koemorph_loss(pred, target, weights, matrix, prev_pred=None, prev_target=None, audio=None, reduction="mean"):
    terms = {}
    if weights["mse"] > 0:
        terms["mse"] = F.mse_loss(pred, target, reduction=reduction)
    if weights["l1"] > 0:
        terms["l1"] = F.l1_loss(pred, target, reduction=reduction)
    if weights["perceptual"] > 0:
        groups = [(range(12, 32), 2.0), (range(0, 12), 1.0), (range(32, 44), 1.0), (range(44, 52), 1.5)]
        p = sum(w * F.mse_loss(pred[:, list(idx)], target[:, list(idx)]) for idx, w in groups)
        if audio is not None:
            mouth = F.normalize(pred[:, 12:32].mean(1).unsqueeze(0), dim=1)
            energy = F.normalize(audio.norm(dim=2).mean(1).unsqueeze(0), dim=1)
            p = p + 0.5 * (1 - F.cosine_similarity(mouth, energy).mean())
        terms["perceptual"] = p
    if weights["temporal"] > 0 and prev_pred is not None:
        terms["temporal"] = F.mse_loss(pred - prev_pred, target - prev_target)
    if weights["velocity"] > 0 and prev_pred is not None:
        terms["velocity"] = F.l1_loss(pred - prev_pred, target - prev_target)
    if weights["sparsity"] > 0:
        terms["sparsity"] = pred.abs().mean()
    if weights["smoothness"] > 0:
        terms["smoothness"] = (pred[:, 1:] - pred[:, :-1]).abs().mean()
    if weights["landmark"] > 0:
        terms["landmark"] = F.mse_loss((pred @ matrix.T).view(-1, 68, 2), (target @ matrix.T).view(-1, 68, 2))
    return sum(weights[k] * v for k, v in terms.items()), terms


@pytest.mark.parametrize("options, with_prev, with_audio", [
    ({}, False, False), ({}, True, True), ({"reduction": "sum", "landmark_weight": 0.0, "mse_weight": 2.0}, True, False),
], ids=["train.py call", "every input", "sum, no landmark"])
def test_matches_the_repository_loss(options, with_prev, with_audio):
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(136, 52, generator=g) * 0.01
    loss_fn = koemorph.KoeMorphLoss(**options, landmark_matrix=matrix, backend="cpu")
    pred, target = torch.rand(6, 52, generator=g), torch.rand(6, 52, generator=g)
    prev = (torch.rand(6, 52, generator=g), torch.rand(6, 52, generator=g)) if with_prev else (None, None)
    audio = torch.randn(6, 4, 80, generator=g) if with_audio else None
    results = []
    for fn in (lambda p: loss_fn(p, target, *prev, audio),
               lambda p: koemorph_loss(p, target, weights_of(loss_fn), matrix, *prev, audio, loss_fn.reduction)):
        leaf = pred.clone().requires_grad_()
        total, terms = fn(leaf)
        (total * 1.3).backward()
        results.append((total.detach(), terms, leaf.grad))
    (total, metrics, grad), (expected, expected_terms, expected_grad) = results
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    for name, value in expected_terms.items():   # the repository's metrics: unweighted terms as floats
        assert isinstance(metrics[name], float) and metrics[name] == pytest.approx(float(value), rel=1e-5, abs=1e-7)
    assert {"mae", "rmse", "correlation", "precision", "recall", "f1_score", "range_ratio"} <= set(metrics)
    assert metrics["mae"] == pytest.approx(float(F.l1_loss(pred, target)), rel=1e-6)


def test_tensor_metrics_and_config():
    loss_fn = koemorph.from_config({"mse_weight": 1.0, "l1_weight": 0.1, "perceptual_weight": 0.5,
                                    "smoothness_weight": 0.0}, metrics="tensors", backend="cpu")
    assert loss_fn.smoothness_weight == 0.0 and loss_fn.temporal_weight == 0.2
    total, terms = loss_fn(torch.rand(3, 52), torch.rand(3, 52))
    assert set(terms) == {"mse", "l1", "perceptual", "sparsity", "landmark"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())
    with pytest.raises(ValueError, match="metrics"):
        koemorph.KoeMorphLoss(metrics="dict")


class RepositoryKoeMorphLoss(nn.Module):
    """The repository's module, restated: plain attributes, nn.MSELoss / nn.L1Loss, a perceptual
    submodule when perceptual_weight > 0, and when landmark_weight > 0 a landmark submodule whose
    [136, 52] parameter (no gradient) is ``torch.randn(136, 52) * 0.01`` of the global stream."""

    def __init__(self, mse_weight=1.0, l1_weight=0.1, perceptual_weight=0.5, temporal_weight=0.2,
                 sparsity_weight=0.01, smoothness_weight=0.1, landmark_weight=0.3, velocity_weight=0.05,
                 reduction="mean", eps=1e-8):
        super().__init__()
        self.mse_weight, self.l1_weight, self.perceptual_weight = mse_weight, l1_weight, perceptual_weight
        self.temporal_weight, self.sparsity_weight, self.smoothness_weight = temporal_weight, sparsity_weight, \
            smoothness_weight
        self.landmark_weight, self.velocity_weight = landmark_weight, velocity_weight
        self.reduction, self.eps = reduction, eps
        self.mse_loss, self.l1_loss = nn.MSELoss(reduction=reduction), nn.L1Loss(reduction=reduction)
        if perceptual_weight > 0:
            self.perceptual_loss = nn.Module()
        if landmark_weight > 0:
            self.landmark_loss = nn.Module()
            self.landmark_loss.bs_to_landmark_weights = nn.Parameter(torch.randn(136, 52) * 0.01, requires_grad=False)

    def forward(self, pred, target, prev_pred=None, prev_target=None, audio_features=None):
        weights = weights_of(self)
        if not hasattr(self, "landmark_loss"):
            weights["landmark"] = 0.0
        matrix = self.landmark_loss.bs_to_landmark_weights if hasattr(self, "landmark_loss") else None
        return koemorph_loss(pred, target, weights, matrix, prev_pred, prev_target, audio_features,
                             self.mse_loss.reduction)


def _both(ours, theirs, g, B=5):
    pred, target = torch.rand(B, 52, generator=g), torch.rand(B, 52, generator=g)
    prev = (torch.rand(B, 52, generator=g), torch.rand(B, 52, generator=g))
    got, expected = ours(pred, target, *prev), theirs(pred, target, *prev)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    assert list(got[1]) == list(expected[1])
    for name, value in expected[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_same_surface_state_dict_and_random_stream():
    """Built after the same seed, ours and the repository's draw the same landmark matrix and leave
    the global stream in the same place; the state dicts have the same keys and load both ways."""
    results = []
    for cls, kwargs in ((koemorph.KoeMorphLoss, {"metrics": "tensors", "backend": "cpu"}), (RepositoryKoeMorphLoss, {})):
        torch.manual_seed(11)
        loss_fn = cls(**kwargs)
        results.append((loss_fn, torch.rand(8)))   # what the run draws next (shuffling, dropout)
    (ours, after), (theirs, expected_after) = results
    assert torch.equal(after, expected_after)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"landmark_loss.bs_to_landmark_weights"}
    assert torch.equal(ours.landmark_loss.bs_to_landmark_weights, theirs.landmark_loss.bs_to_landmark_weights)
    for name in ("mse_weight", "velocity_weight", "reduction", "eps", "mse_loss", "l1_loss", "perceptual_loss",
                 "landmark_loss"):
        assert hasattr(ours, name), name
    g = torch.Generator().manual_seed(0)
    _both(ours, theirs, g)
    torch.manual_seed(12)
    other = RepositoryKoeMorphLoss()           # another matrix: an upstream checkpoint loads into ours ...
    ours.load_state_dict(other.state_dict())
    _both(ours, other, g)
    with torch.no_grad():
        ours.landmark_loss.bs_to_landmark_weights.mul_(3)   # ... ours into upstream, edits included
    theirs.load_state_dict(ours.state_dict())
    _both(ours, theirs, g)
    # A private seed draws nothing from the global stream.
    torch.manual_seed(11)
    seeded = koemorph.KoeMorphLoss(landmark_seed=5, metrics="tensors", backend="cpu")
    drawn = torch.rand(8)
    torch.manual_seed(11)
    assert torch.equal(drawn, torch.rand(8))
    assert not torch.equal(seeded.landmark_loss.bs_to_landmark_weights, theirs.landmark_loss.bs_to_landmark_weights)


@pytest.mark.parametrize("name, value", [("mse_weight", 2.5), ("l1_weight", 0.0), ("perceptual_weight", -1.0),
                                         ("temporal_weight", 3.0), ("sparsity_weight", 0.5),
                                         ("smoothness_weight", -0.2), ("landmark_weight", 1.7),
                                         ("velocity_weight", 0.0), ("reduction", "sum")])
def test_assigned_attributes_take_effect(name, value):
    """Every attribute assigned between calls changes the next total as in the repository's loss;
    a weight <= 0 switches its term off."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    ours = koemorph.KoeMorphLoss(metrics="tensors", backend="cpu")
    torch.manual_seed(0)
    theirs = RepositoryKoeMorphLoss()
    _both(ours, theirs, g)
    setattr(ours, name, value)
    setattr(theirs, name, value)
    if name == "reduction":   # (the repository's reduction lives in its criteria)
        theirs.mse_loss.reduction = theirs.l1_loss.reduction = value
    _both(ours, theirs, g)


def test_weight_at_or_below_zero_switches_the_term_off():
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    loss_fn = koemorph.KoeMorphLoss(landmark_weight=-0.3, perceptual_weight=0.0, metrics="tensors", backend="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)   # no matrix drawn, as upstream
    assert not hasattr(loss_fn, "landmark_loss") and not hasattr(loss_fn, "perceptual_loss")
    total, terms = loss_fn(torch.rand(3, 52), torch.rand(3, 52))
    assert "landmark" not in terms and "perceptual" not in terms and set(terms) == {"mse", "l1", "sparsity",
                                                                                       "smoothness"}
    with pytest.raises(ValueError, match="landmark_loss"):
        loss_fn.landmark_weight = 0.3   # no matrix: raises rather than skipping the term silently
    loss_fn.landmark_matrix = torch.rand(136, 52)
    loss_fn.landmark_weight, loss_fn.perceptual_weight = 0.3, 0.5
    assert {"landmark", "perceptual"} <= set(loss_fn(torch.rand(3, 52), torch.rand(3, 52))[1])


@pytest.mark.parametrize("edit", ["in place", "replaced"])
def test_perceptual_groups_edited_take_effect(edit):
    """The group term follows ``perceptual_loss``'s groups as they are at each call: a group's
    index list edited in place or replaced changes the next total (and the audio-visual term's
    mouth columns) as in the plain group-weighted MSE."""
    g = torch.Generator().manual_seed(5)
    pred, target, audio = torch.rand(4, 52, generator=g), torch.rand(4, 52, generator=g), torch.rand(4, 3, 8, generator=g)
    loss_fn = koemorph.KoeMorphLoss(landmark_weight=0.0, metrics="tensors", backend="cpu")
    loss_fn(pred, target, audio_features=audio)
    surface = loss_fn.perceptual_loss
    if edit == "in place":
        del surface.mouth_group[10:]               # the same list object groups["mouth"] holds
    else:
        surface.mouth_group = list(range(14, 20))
        surface.groups["mouth"] = surface.mouth_group
    _, terms = loss_fn(pred, target, audio_features=audio)
    torch.testing.assert_close(terms["perceptual"], surface(pred, target, audio_features=audio))
    mouth = list(surface.mouth_group)
    expected = (2.0 * F.mse_loss(pred[:, mouth], target[:, mouth])
                + sum(w * F.mse_loss(pred[:, list(idx)], target[:, list(idx)])
                      for idx, w in ((range(0, 12), 1.0), (range(32, 44), 1.0), (range(44, 52), 1.5))))
    assert not torch.allclose(terms["perceptual"], koemorph.KoeMorphLoss(landmark_weight=0.0, metrics="tensors",
                                                                        backend="cpu")(pred, target, audio_features=audio)[1]["perceptual"])
    torch.testing.assert_close(surface(pred, target), expected)
