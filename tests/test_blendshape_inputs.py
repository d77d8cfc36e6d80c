"""Bad input to the blendshape loss: a clear TypeError / ValueError naming the argument, before any kernel."""

import pytest
import torch

import fusedloss
from fusedloss import functional as F
from fusedloss.blendshape import functional as blendshape_functional


@pytest.fixture
def no_kernel(monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("a backend ran before the input was rejected")

    monkeypatch.setattr(blendshape_functional, "operators", reached)
    monkeypatch.setattr(blendshape_functional, "blendshape_loss_reference", reached)


P = torch.rand(4, 52)
T = torch.rand(4, 52)
S = torch.rand(4, 6, 52)
M = torch.randn(10, 52)

CASES = [
    (TypeError, ["pred", "Tensor"], lambda: F.blendshape_loss([0.1], T)),
    (TypeError, ["pred", "float"], lambda: F.blendshape_loss(P.long(), T.long())),
    (ValueError, ["pred", "[B, K] or [B, T, K]"], lambda: F.blendshape_loss(P[0], T[0])),
    (ValueError, ["pred", "[B, K] or [B, T, K]"], lambda: F.blendshape_loss(S[None], S[None])),
    (ValueError, ["pred", "at least one"], lambda: F.blendshape_loss(P[:, :0], T[:, :0])),
    (TypeError, ["target", "Tensor"], lambda: F.blendshape_loss(P, None)),
    (ValueError, ["target", "shape"], lambda: F.blendshape_loss(P, T[:, :51])),
    (TypeError, ["target", "dtype"], lambda: F.blendshape_loss(P, T.double())),
    (ValueError, ["target", "device"], lambda: F.blendshape_loss(P, T.to("meta"))),
    (ValueError, ["raw_pred", "shape"], lambda: F.blendshape_loss(P, T, raw_pred=P[:3], smoothing_weight=0.1)),
    (TypeError, ["prev_pred", "dtype"], lambda: F.blendshape_loss(P, T, prev_pred=P.half(), consistency_weight=0.1)),
    (TypeError, ["mse_weight", "real"], lambda: F.blendshape_loss(P, T, mse_weight="1")),
    (TypeError, ["l1_weight", "real"], lambda: F.blendshape_loss(P, T, l1_weight=torch.tensor(0.1))),
    (ValueError, ["temporal_weight", "finite"], lambda: F.blendshape_loss(S, S, temporal_weight=float("inf"))),
    (ValueError, ["threshold", "finite"], lambda: F.blendshape_loss(P, T, threshold=float("nan"))),
    (ValueError, ["landmark_matrix", "required"], lambda: F.blendshape_loss(P, T, landmark_weight=0.1)),
    (ValueError, ["landmark_matrix", "K = 52"], lambda: F.blendshape_loss(P, T, landmark_weight=0.1, landmark_matrix=M[:, :50])),
    (ValueError, ["landmark_matrix", "[J, K]"], lambda: F.blendshape_loss(P, T, landmark_weight=0.1, landmark_matrix=M[0])),
    (ValueError, ["landmark_matrix", "device"],
     lambda: F.blendshape_loss(P, T, landmark_weight=0.1, landmark_matrix=M.to("meta"))),
    (TypeError, ["perceptual_groups", "sequence"], lambda: F.blendshape_loss(P, T, perceptual_groups="mouth")),
    (ValueError, ["perceptual_groups[0]", "(indices, weight)"], lambda: F.blendshape_loss(P, T, perceptual_groups=[[1, 2, 3]])),
    (ValueError, ["perceptual_groups[0] indices", "non-empty"], lambda: F.blendshape_loss(P, T, perceptual_groups=[([], 1.0)])),
    (TypeError, ["perceptual_groups[0] index", "integer"], lambda: F.blendshape_loss(P, T, perceptual_groups=[([0.5], 1.0)])),
    (ValueError, ["perceptual_groups[1]", "out of range", "K = 52"],
     lambda: F.blendshape_loss(P, T, perceptual_groups=[([0], 1.0), ([51, 52], 1.0)])),
    (ValueError, ["perceptual_groups[0] indices", ">= 0"], lambda: F.blendshape_loss(P, T, perceptual_groups=[([-1], 1.0)])),
    (TypeError, ["perceptual_groups[0] weight", "real"], lambda: F.blendshape_loss(P, T, perceptual_groups=[([1], None)])),
    (ValueError, ["backend", "'cpu'"], lambda: F.blendshape_loss(P, T, backend="fast")),
    (TypeError, ["return_components", "bool"], lambda: F.blendshape_loss(P, T, return_components=1)),
    (ValueError, ["landmark_matrix", "required"], lambda: fusedloss.BlendshapeLoss(landmark_weight=0.1)),
    (ValueError, ["landmark_matrix", "[J, K]"], lambda: fusedloss.BlendshapeLoss(landmark_matrix=M[0])),
    (ValueError, ["backend"], lambda: fusedloss.BlendshapeLoss(backend="gpu")),
    (TypeError, ["pred", "Tensor"], lambda: fusedloss.BlendshapeLoss()(None, T)),
    (TypeError, ["mse_weight", "real"], lambda: setattr(fusedloss.BlendshapeLoss(), "mse_weight", "big")),
    (ValueError, ["landmark_weight", "landmark_matrix"], lambda: setattr(fusedloss.BlendshapeLoss(), "landmark_weight", 1.0)),
]


@pytest.mark.parametrize("error,words,call", CASES, ids=[f"{i}-{c[1][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_rejected_before_any_kernel(no_kernel, error, words, call):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"


def test_terms_that_lack_their_input_are_not_computed():
    """docs/losses.md §2.2: a term is computed when its weight is non-zero *and its inputs are given*."""
    total, terms = F.blendshape_loss(P, T, smoothing_weight=0.1, consistency_weight=0.2, temporal_weight=0.3,
                                     return_components=True)
    assert list(terms) == ["mse", "l1", "perceptual", "total"]


def test_prev_pred_requiring_grad_gets_none():
    """The consistency term treats prev_pred as detached: no gradient, and no error."""
    prev = torch.rand(4, 52, requires_grad=True)
    pred = P.clone().requires_grad_()
    F.blendshape_loss(pred, T, prev_pred=prev, consistency_weight=1.0, backend="cpu").backward()
    assert prev.grad is None and pred.grad is not None


def test_landmark_matrix_requiring_grad_gets_none():
    m = M.clone().requires_grad_()
    pred = P.clone().requires_grad_()
    for backend in ("cpu", "reference"):
        F.blendshape_loss(pred, T, landmark_weight=1.0, landmark_matrix=m, backend=backend).backward()
    assert m.grad is None
