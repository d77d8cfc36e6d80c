"""fusedloss.integrations.tigas against the published package (tigas-metric 0.2.1, installed by
scripts/install.sh without its dependencies).

The package's top-level ``tigas/__init__.py`` imports its inference API, which needs torchvision
(not installed: the package declares torchvision, OpenCV, scikit-learn and more, none of which its
training code uses). So ``fusedloss.integrations.tigas.import_training()`` puts ``tigas`` in
``sys.modules`` as a bare package over the installed folder: ``import tigas.training`` then runs
only ``tigas/training`` and ``tigas/models``, never the top-level ``__init__``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from fusedloss.integrations import tigas as ours


def _import_tigas_training():
    if importlib.util.find_spec("tigas") is None:
        pytest.skip("tigas-metric is not installed (scripts/install.sh installs it)")
    if importlib.metadata.version("tigas-metric") != "0.2.1":
        pytest.skip(f"tigas-metric {importlib.metadata.version('tigas-metric')} installed; these tests pin 0.2.1")
    return ours.import_training()   # (the bare package of this module's docstring)


@pytest.fixture(scope="module")
def tigas_training():
    return _import_tigas_training()


def batch(g: torch.Generator, B: int, kind: str = "binary"):
    scores = torch.rand(B, 1, generator=g).requires_grad_()
    logits = torch.randn(B, 2, generator=g).requires_grad_()
    if kind == "binary":
        labels = (torch.rand(B, 1, generator=g) > 0.6).float()
    elif kind == "all real":
        labels = torch.ones(B, 1)
    else:  # soft labels: the package's classes truncate them, and its ranking skips them
        labels = torch.rand(B, 1, generator=g).mul(4).round().div(4)
    return scores, logits, labels


def run(loss_fn, scores, logits, labels):
    s, l = scores.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    losses = loss_fn({"score": s, "logits": l}, labels)
    (losses["total"] * 1.7 + losses["ranking"] * 0.3).backward()
    return {k: v.detach() for k, v in losses.items()}, s.grad, l.grad


CONFIGS = [
    {},
    {"use_smooth_l1": False, "margin": 0.2, "max_ranking_pairs": 5, "ranking_weight": 1.5},
    {"max_ranking_pairs": 1000, "classification_weight": 0.0},
]


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "mse, 5 pairs", "all pairs fit"])
def test_sampled_reproduces_the_package_call_after_call(tigas_training, config):
    original = tigas_training.TIGASLoss(**config)
    fused = ours.TIGASLoss(**config, pairs="sampled", backend="cpu")
    g = torch.Generator().manual_seed(0)
    for call in range(40):
        B = [1, 7, 16, 33][call % 4]
        kind = ["binary", "binary", "all real", "soft"][call % 4]
        inputs = batch(g, B, kind)
        expected, expected_ds, expected_dl = run(original, *inputs)
        got, ds, dl = run(fused, *inputs)
        for key in ("total", "regression", "classification", "ranking"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=f"call {call} {key}")
        torch.testing.assert_close(ds, expected_ds, rtol=1e-6, atol=1e-7, msg=f"call {call} d/dscore")
        torch.testing.assert_close(dl, expected_dl, rtol=1e-6, atol=1e-7, msg=f"call {call} d/dlogits")
        assert int(fused._iteration) == int(original._iteration), f"call {call}"
    assert int(fused._iteration) > 10   # the sampled pairs really moved on
    assert set(fused.state_dict()) == set(original.state_dict()) == {"_iteration"}


def test_all_pairs_is_the_exact_ranking_over_the_same_sets(tigas_training):
    from fusedloss.reference import all_pairs_margin_ranking_reference

    g = torch.Generator().manual_seed(1)
    fused = ours.TIGASLoss(margin=0.4, backend="cpu")
    original = tigas_training.TIGASLoss(margin=0.4, max_ranking_pairs=10**9)
    for B in (2, 9, 64):
        scores, logits, labels = batch(g, B)
        got, ds, dl = run(fused, scores, logits, labels)
        expected = run(original, scores, logits, labels)[0]
        for key in ("regression", "classification"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
        ranking = all_pairs_margin_ranking_reference(scores.view(-1), labels.view(-1), 0.4, "mean")
        torch.testing.assert_close(got["ranking"], ranking.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["total"], expected["regression"] + 0.5 * expected["classification"]
                                   + 0.3 * ranking.detach(), rtol=1e-6, atol=1e-7)
    assert int(fused._iteration) == 0   # no sampling, no host sync


@pytest.mark.parametrize("pairs", ["all", "sampled"])
def test_weights_and_margin_can_be_assigned(tigas_training, pairs):
    original, fused = tigas_training.TIGASLoss(max_ranking_pairs=10**9), ours.TIGASLoss(pairs=pairs, backend="cpu")
    for loss_fn in (original, fused):
        loss_fn.regression_weight, loss_fn.classification_weight, loss_fn.ranking_weight = 0.2, 0.7, 1.1
        loss_fn.margin = 0.9
    scores, logits, labels = batch(torch.Generator().manual_seed(3), 5)
    labels = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]])
    got, expected = run(fused, scores, logits, labels)[0], run(original, scores, logits, labels)[0]
    if pairs == "sampled":
        torch.testing.assert_close(got["total"], expected["total"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["total"], 0.2 * got["regression"] + 0.7 * got["classification"]
                               + 1.1 * got["ranking"], rtol=1e-6, atol=1e-7)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="pairs"):
        ours.TIGASLoss(pairs="some")
    with pytest.raises(ValueError, match="max_ranking_pairs"):
        ours.TIGASLoss(max_ranking_pairs=-1)
    with pytest.raises(TypeError, match="margin"):
        ours.TIGASLoss(margin="0.5")


def _loader(g: torch.Generator, batches: int, B: int = 4, size: int = 32):
    images = torch.rand(batches * B, 3, size, size, generator=g)
    labels = (torch.arange(batches * B) % 2).float().view(-1, 1)
    data = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(data, batch_size=B, shuffle=False)


def _train(tigas_training, loss_fn, tmp_path, name):
    """Two optimiser steps of the package's own TIGASTrainer with a small TIGASModel."""
    from tigas.models.tigas_model import TIGASModel

    torch.manual_seed(0)
    model = TIGASModel(img_size=32, base_channels=8, feature_dim=32, num_attention_heads=2, fast_mode=True)
    # SGD: a step proportional to the gradient, so equal weights mean equal gradients (AdamW's first
    # steps are about lr * sign(gradient), which rounding-level gradients of parameters whose true
    # gradient is 0, conv biases before BatchNorm, would flip).
    trainer = tigas_training.TIGASTrainer(model, _loader(torch.Generator().manual_seed(2), 2), loss_fn=loss_fn,
                                          optimizer_config={"optimizer_type": "sgd", "learning_rate": 0.05},
                                          device="cpu", output_dir=str(tmp_path / name), use_amp=False)
    trainer.current_epoch = 0
    losses = trainer.train_epoch()
    return losses, model.state_dict()


def test_the_package_trainer_trains_with_ours(tigas_training, tmp_path):
    """TIGASTrainer with the package's CombinedLoss, then patched by apply(): "sampled" gives the
    same losses and weights; "all" trains too."""
    reference_losses, reference_weights = _train(tigas_training, tigas_training.CombinedLoss(), tmp_path, "original")
    try:
        ours.apply(pairs="sampled", backend="cpu")
        loss_fn = tigas_training.CombinedLoss()   # the package's own class, building ours inside
        assert isinstance(loss_fn.tigas_loss, ours.TIGASLoss) and loss_fn.tigas_loss.pairs == "sampled"
        losses, weights = _train(tigas_training, loss_fn, tmp_path, "sampled")
        ours.apply()   # "all"
        all_losses, _ = _train(tigas_training, tigas_training.CombinedLoss(), tmp_path, "all")
    finally:
        ours.revert()
    assert type(tigas_training.CombinedLoss().tigas_loss).__module__ == "tigas.training.losses"   # reverted
    for key, value in reference_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, w in reference_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert all(torch.isfinite(torch.tensor(v)) for v in all_losses.values())
    assert all_losses["ranking"] != losses["ranking"]   # every pair, not the sampled ones


@pytest.mark.parametrize("pairs", ["all", "sampled"])
def test_use_smooth_l1_and_regression_loss_can_be_switched(tigas_training, pairs):
    """use_smooth_l1 assigned (or the package's regression_loss replaced) takes effect, as a
    package loss built with it computes; the state dict stays the package's."""
    g = torch.Generator().manual_seed(4)
    fused = ours.TIGASLoss(pairs=pairs, max_ranking_pairs=10**9, backend="cpu")
    for switch in ("use_smooth_l1", "regression_loss"):
        for smooth in (False, True):
            if switch == "use_smooth_l1":
                fused.use_smooth_l1 = smooth
            else:
                fused.regression_loss = torch.nn.SmoothL1Loss() if smooth else torch.nn.MSELoss()
            assert fused.use_smooth_l1 is smooth
            assert type(fused.regression_loss) is (torch.nn.SmoothL1Loss if smooth else torch.nn.MSELoss)
            original = tigas_training.TIGASLoss(use_smooth_l1=smooth, max_ranking_pairs=10**9)
            scores, logits, labels = batch(g, 9)
            got, expected = run(fused, scores, logits, labels)[0], run(original, scores, logits, labels)[0]
            torch.testing.assert_close(got["regression"], expected["regression"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="regression_loss"):
        fused.regression_loss = torch.nn.HuberLoss(delta=2.0)
    assert set(fused.state_dict()) == {"_iteration"}


def test_pairs_can_be_switched(tigas_training):
    """pairs assigned between calls: "sampled" -> "all" puts the exact ranking (with its weight) back
    into the fused total, and "all" -> "sampled" takes it out again."""
    g = torch.Generator().manual_seed(5)
    loss_fn = ours.TIGASLoss(pairs="sampled", ranking_weight=0.7, backend="cpu")
    scores, logits, labels = batch(g, 12)
    for pairs in ("all", "sampled", "all"):
        loss_fn.pairs = pairs
        fresh = ours.TIGASLoss(pairs=pairs, ranking_weight=0.7, backend="cpu")
        fresh._iteration.copy_(loss_fn._iteration)
        got, expected = run(loss_fn, scores, logits, labels), run(fresh, scores, logits, labels)
        for key in expected[0]:
            torch.testing.assert_close(got[0][key], expected[0][key], rtol=1e-6, atol=1e-7, msg=f"{pairs} {key}")
        torch.testing.assert_close(got[1], expected[1])
        torch.testing.assert_close(got[0]["total"], got[0]["regression"] + 0.5 * got[0]["classification"]
                                   + 0.7 * got[0]["ranking"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="pairs"):
        loss_fn.pairs = "some"
