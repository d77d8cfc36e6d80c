"""fusedloss.integrations.koemorph against KoeMorph's loss as its repository defines it.

KoeMorph is not a package, so ``koemorph_loss`` below restates, in plain PyTorch, what its
``src/model/losses.py`` ``KoeMorphLoss`` computes (see the adapter's docstring for the terms).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedloss.integrations import koemorph


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
               lambda p: koemorph_loss(p, target, loss_fn.weights, matrix, *prev, audio, loss_fn.reduction)):
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
    assert loss_fn.weights["smoothness"] == 0.0 and loss_fn.weights["temporal"] == 0.2
    total, terms = loss_fn(torch.rand(3, 52), torch.rand(3, 52))
    assert set(terms) == {"mse", "l1", "perceptual", "sparsity", "landmark"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values())
    with pytest.raises(ValueError, match="metrics"):
        koemorph.KoeMorphLoss(metrics="dict")
