"""Bad input to the score losses (CombinedLoss, AllPairsMarginRankingLoss): a clear TypeError /
ValueError naming the argument, before any kernel; and the forms of good input that are accepted."""

import pytest
import torch

import fusedloss
from fusedloss import backends
from fusedloss import functional as F
from fusedloss.score import functional as score_functional
from fusedloss.score import layout as score_layout


@pytest.fixture
def no_kernel(monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("a backend ran before the input was rejected")

    monkeypatch.setattr(score_functional, "operator", reached)
    monkeypatch.setattr(score_functional, "score_loss_reference", reached)
    monkeypatch.setattr(score_functional, "all_pairs_margin_ranking_reference", reached)


def need_cpu_backend():
    reason = backends.unavailable_reason("cpu", "cpu")
    if reason:
        pytest.skip(reason)


B = 6
S = torch.rand(B)
G = torch.randn(B, 2)
Y = torch.tensor([1.0, 0.0, 0.75, 0.25, 1.0, 0.0])

combined = F.combined_loss
ranking = F.all_pairs_margin_ranking_loss
Combined = fusedloss.CombinedLoss
Ranking = fusedloss.AllPairsMarginRankingLoss
NAN, INF = float("nan"), float("inf")

CASES = [
    # --- combined_loss: scores
    (TypeError, ["scores", "Tensor"], lambda: combined([0.1] * B, G, Y)),
    (TypeError, ["scores", "float"], lambda: combined(S.long(), G, Y)),
    (TypeError, ["scores", "float"], lambda: combined(S.bool(), G, Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: combined(torch.rand(B, 2), G, Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: combined(torch.rand(B, 1, 1), G, Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: combined(S[0], G, Y)),
    # --- combined_loss: logits
    (TypeError, ["logits", "Tensor"], lambda: combined(S, None, Y)),
    (TypeError, ["logits", "Tensor"], lambda: combined(S, G.tolist(), Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: combined(S, torch.randn(B, 3), Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: combined(S, torch.randn(B), Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: combined(S, torch.randn(B, 2, 1), Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: combined(S, G[: B - 1], Y)),
    (TypeError, ["logits", "dtype"], lambda: combined(S, G.double(), Y)),
    (TypeError, ["logits", "dtype"], lambda: combined(S.half(), G, Y)),
    (TypeError, ["logits", "float"], lambda: combined(S, G.long(), Y)),
    (ValueError, ["logits", "device"], lambda: combined(S, G.to("meta"), Y)),
    # --- combined_loss: labels
    (TypeError, ["labels", "Tensor"], lambda: combined(S, G, None)),
    (TypeError, ["labels", "Tensor"], lambda: combined(S, G, Y.tolist())),
    (TypeError, ["labels", "float"], lambda: combined(S, G, Y.long())),
    (TypeError, ["labels", "float"], lambda: combined(S, G, Y > 0.5)),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S, G, Y[: B - 1])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S[:, None], G, Y[: B - 1])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S, G, torch.rand(B, 2))),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S, G, Y[None])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S, G, Y[0])),
    (ValueError, ["labels", "device"], lambda: combined(S, G, Y.to("meta"))),
    # --- combined_loss: options
    (ValueError, ["regression_type", "'mse'"], lambda: combined(S, G, Y, regression_type="l2")),
    (ValueError, ["regression_type", "'smoothl1'"], lambda: combined(S, G, Y, regression_type=None)),
    (TypeError, ["regression_weight", "real"], lambda: combined(S, G, Y, regression_weight="1")),
    (TypeError, ["regression_weight", "real"], lambda: combined(S, G, Y, regression_weight=True)),
    (TypeError, ["classification_weight", "real"], lambda: combined(S, G, Y, classification_weight=torch.tensor(0.3))),
    (TypeError, ["ranking_weight", "real"], lambda: combined(S, G, Y, ranking_weight=None)),
    (TypeError, ["ranking_weight", "real"], lambda: combined(S, G, Y, ranking_weight=1j)),
    (ValueError, ["regression_weight", "finite"], lambda: combined(S, G, Y, regression_weight=NAN)),
    (ValueError, ["classification_weight", "finite"], lambda: combined(S, G, Y, classification_weight=-INF)),
    (ValueError, ["ranking_weight", "finite"], lambda: combined(S, G, Y, ranking_weight=INF)),
    (ValueError, ["margin", "finite"], lambda: combined(S, G, Y, margin=NAN)),
    (TypeError, ["margin", "real"], lambda: combined(S, G, Y, margin="0.5")),
    (TypeError, ["margin", "real"], lambda: combined(S, G, Y, margin=False)),
    (TypeError, ["check_finite", "bool"], lambda: combined(S, G, Y, check_finite=1)),
    (TypeError, ["check_finite", "bool"], lambda: combined(S, G, Y, check_finite="yes")),
    (TypeError, ["check_finite", "bool"], lambda: combined(S, G, Y, check_finite=None)),
    (ValueError, ["backend", "'cpu'"], lambda: combined(S, G, Y, backend="fast")),
    (ValueError, ["backend", "'reference'"], lambda: combined(S, G, Y, backend=None)),
    # --- all_pairs_margin_ranking_loss
    (TypeError, ["scores", "Tensor"], lambda: ranking(None, Y)),
    (TypeError, ["scores", "float"], lambda: ranking(S.int(), Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: ranking(torch.rand(B, 2), Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: ranking(torch.rand(B, 1, 1), Y)),
    (TypeError, ["labels", "Tensor"], lambda: ranking(S, None)),
    (TypeError, ["labels", "float"], lambda: ranking(S, Y.long())),
    (TypeError, ["labels", "float"], lambda: ranking(S, Y > 0.5)),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: ranking(S, Y[: B - 1])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: ranking(S, torch.rand(B, 2))),
    (ValueError, ["labels", "device"], lambda: ranking(S, Y.to("meta"))),
    (ValueError, ["margin", "finite"], lambda: ranking(S, Y, margin=INF)),
    (TypeError, ["margin", "real"], lambda: ranking(S, Y, margin="0.5")),
    (ValueError, ["reduction", "'mean'"], lambda: ranking(S, Y, reduction="none")),
    (ValueError, ["reduction", "'sum'"], lambda: ranking(S, Y, reduction=None)),
    (ValueError, ["backend", "'cpu'"], lambda: ranking(S, Y, backend="gpu")),
    # --- CombinedLoss: constructor and attributes
    (ValueError, ["regression_type", "'mse'"], lambda: Combined(regression_type="l2")),
    (TypeError, ["regression_weight", "real"], lambda: Combined(regression_weight="1")),
    (ValueError, ["classification_weight", "finite"], lambda: Combined(classification_weight=NAN)),
    (ValueError, ["margin", "finite"], lambda: Combined(margin=INF)),
    (TypeError, ["check_finite", "bool"], lambda: Combined(check_finite=0)),
    (ValueError, ["backend"], lambda: Combined(backend="gpu")),
    (ValueError, ["backend"], lambda: Combined(backend=None)),
    (ValueError, ["margin", "finite"], lambda: setattr(Combined(), "margin", NAN)),
    (TypeError, ["ranking_weight", "real"], lambda: setattr(Combined(), "ranking_weight", "big")),
    # --- CombinedLoss: forward
    (TypeError, ["scores", "Tensor"], lambda: Combined()(None, G, Y)),
    (TypeError, ["scores", "float"], lambda: Combined()(S.long(), G, Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: Combined()(torch.rand(B, 2), G, Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: Combined()(torch.rand(B, 1, 1), G, Y)),
    (TypeError, ["logits", "Tensor"], lambda: Combined()(S, None, Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: Combined()(S, torch.randn(B, 3), Y)),
    (ValueError, ["logits", "[B, 2]"], lambda: Combined()(S, torch.randn(B), Y)),
    (TypeError, ["logits", "dtype"], lambda: Combined()(S, G.double(), Y)),
    (ValueError, ["logits", "device"], lambda: Combined()(S, G.to("meta"), Y)),
    (TypeError, ["labels", "Tensor"], lambda: Combined()(S, G, None)),
    (TypeError, ["labels", "float"], lambda: Combined()(S, G, Y.long())),
    (TypeError, ["labels", "float"], lambda: Combined()(S, G, Y > 0.5)),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: Combined()(S, G, Y[: B - 1])),
    (ValueError, ["labels", "device"], lambda: Combined()(S, G, Y.to("meta"))),
    # --- AllPairsMarginRankingLoss: constructor and attributes
    (ValueError, ["reduction", "'mean'"], lambda: Ranking(reduction="none")),
    (ValueError, ["margin", "finite"], lambda: Ranking(margin=INF)),
    (TypeError, ["margin", "real"], lambda: Ranking(margin="x")),
    (ValueError, ["backend"], lambda: Ranking(backend="fast")),
    (TypeError, ["margin", "real"], lambda: setattr(Ranking(), "margin", None)),
    (ValueError, ["margin", "finite"], lambda: setattr(Ranking(), "margin", NAN)),
    # --- AllPairsMarginRankingLoss: forward
    (TypeError, ["scores", "Tensor"], lambda: Ranking()(None, Y)),
    (TypeError, ["scores", "float"], lambda: Ranking()(S.long(), Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: Ranking()(torch.rand(B, 2), Y)),
    (ValueError, ["scores", "[B] or [B, 1]"], lambda: Ranking()(torch.rand(B, 1, 1), Y)),
    (TypeError, ["labels", "Tensor"], lambda: Ranking()(S, None)),
    (TypeError, ["labels", "float"], lambda: Ranking()(S, Y.long())),
    (TypeError, ["labels", "float"], lambda: Ranking()(S, Y > 0.5)),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: Ranking()(S, Y[: B - 1])),
    (ValueError, ["labels", "device"], lambda: Ranking()(S, Y.to("meta"))),
]

# [N, 1] labels with N != B (once read as their column without checking N).
CASES += [
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S, G, Y[: B - 1, None])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: combined(S[:, None], G, Y[: B - 1, None])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: ranking(S, Y[: B - 1, None])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: ranking(S, Y[:1, None])),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: Combined()(S, G, torch.rand(B + 1, 1))),
    (ValueError, ["labels", "[B] or [B, 1]"], lambda: Ranking()(S[:, None], Y[: B - 1, None])),
]


@pytest.mark.parametrize("error,words,call", CASES, ids=[f"{i}-{c[1][0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_rejected_before_any_kernel(no_kernel, error, words, call):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"


# ---------------------------------------------------------------------------------------------
# Good input: [B] and [B, 1] forms, any float dtype of labels
# ---------------------------------------------------------------------------------------------

SHAPES = {"B": lambda x: x, "B1": lambda x: x[:, None], "B1-strided": lambda x: torch.stack([x, -x, x], 1)[:, 2:3]}


def score_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    logits = torch.randn(B, 2, generator=g, dtype=torch.float64).to(dtype)
    return scores, logits, Y.to(torch.float64)


def assert_same(actual, expected, msg):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("labels_shape", list(SHAPES))
@pytest.mark.parametrize("scores_shape", list(SHAPES))
def test_b_and_b1_forms_are_accepted_and_agree(backend, scores_shape, labels_shape):
    if backend == "cpu":
        need_cpu_backend()
    scores, logits, labels = score_inputs()
    s, y = SHAPES[scores_shape](scores), SHAPES[labels_shape](labels)
    assert s.shape[0] == B and y.shape[0] == B
    where = f"{backend} scores {tuple(s.shape)} labels {tuple(y.shape)}"

    total, terms = combined(scores, logits, labels, backend=backend)
    got_total, got_terms = combined(s, logits, y, backend=backend)
    assert got_total.shape == () and list(got_terms) == ["regression", "classification", "ranking", "total"]
    assert_same(got_total, total, f"combined_loss {where}")
    for name in terms:
        assert_same(got_terms[name], terms[name], f"combined_loss[{name}] {where}")
    assert_same(Combined(backend=backend)(s, logits, y)[0], total, f"CombinedLoss {where}")

    for reduction in ("mean", "sum"):
        expected = ranking(scores, labels, reduction=reduction, backend=backend)
        got = ranking(s, y, reduction=reduction, backend=backend)
        assert got.shape == ()
        assert_same(got, expected, f"all_pairs_margin_ranking_loss({reduction}) {where}")
        assert_same(Ranking(reduction=reduction, backend=backend)(s, y), expected,
                    f"AllPairsMarginRankingLoss({reduction}) {where}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("labels_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scores_dtype", [torch.float64, torch.float32], ids=str)
def test_labels_of_any_float_dtype_are_accepted(backend, scores_dtype, labels_dtype):
    """The labels (0, 0.25, 0.75, 1: exact in every float dtype) may have any float dtype."""
    if backend == "cpu":
        need_cpu_backend()
    scores, logits, labels = score_inputs(scores_dtype)
    _, terms = combined(scores, logits, labels.to(scores_dtype), backend=backend)
    _, got_terms = combined(scores, logits, labels.to(labels_dtype)[:, None], backend=backend)
    for name in terms:
        assert_same(got_terms[name], terms[name], f"combined_loss[{name}] labels {labels_dtype}")
    expected = ranking(scores, labels.to(scores_dtype), backend=backend)
    assert_same(ranking(scores[:, None], labels.to(labels_dtype), backend=backend), expected,
                f"all_pairs_margin_ranking_loss labels {labels_dtype}")


# ---------------------------------------------------------------------------------------------
# Labels are targets: detached, whatever their requires_grad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_labels_requiring_grad_get_none(backend):
    if backend == "cpu":
        need_cpu_backend()
    scores, logits, labels = score_inputs()
    for shape in ("B", "B1"):
        s = SHAPES[shape](scores.clone()).requires_grad_()
        g = logits.clone().requires_grad_()
        y = SHAPES[shape](labels.clone()).requires_grad_()
        total, _ = combined(s, g, y, backend=backend)
        total.backward()
        assert y.grad is None, f"{backend}: labels got a gradient from combined_loss"
        assert s.grad is not None and g.grad is not None
        assert torch.isfinite(s.grad).all() and torch.isfinite(g.grad).all()

        s.grad = None
        (ranking(s, y, backend=backend) + Ranking(backend=backend)(s, y)).backward()
        Combined(backend=backend)(s, g, y)[0].backward()
        assert y.grad is None, f"{backend}: labels got a gradient from a module or the ranking loss"
        assert s.grad is not None


# ---------------------------------------------------------------------------------------------
# The C++ operator itself checks its arguments (TORCH_CHECK -> RuntimeError), never crashes
# ---------------------------------------------------------------------------------------------


def op_args():
    scores, logits, labels = score_inputs()
    settings = torch.tensor([1.0, 0.3, 0.2, 0.5], dtype=torch.float64)
    return dict(scores=scores, logits=logits, labels=labels, settings=settings, term_mask=score_layout.ALL_TERMS,
                smooth_l1=False, ranking_sum=False)


ORDER = ("scores", "logits", "labels", "settings", "term_mask", "smooth_l1", "ranking_sum")

MALFORMED = {
    "settings-length-3": dict(settings=torch.tensor([1.0, 0.3, 0.2], dtype=torch.float64)),
    "settings-length-5": dict(settings=torch.tensor([1.0, 0.3, 0.2, 0.5, 0.0], dtype=torch.float64)),
    "settings-empty": dict(settings=torch.empty(0, dtype=torch.float64)),
    "settings-float32": dict(settings=torch.tensor([1.0, 0.3, 0.2, 0.5])),
    "settings-2d": dict(settings=torch.tensor([[1.0, 0.3, 0.2, 0.5]], dtype=torch.float64)),
    "settings-strided": dict(settings=torch.zeros(8, dtype=torch.float64)[::2]),
    "scores-B2": dict(scores=torch.rand(B, 2, dtype=torch.float64)),  # ([B, 1] is accepted)
    "scores-int": dict(scores=torch.arange(B)),
    "labels-short": dict(labels=Y[: B - 1].double()),
    "labels-B2": dict(labels=torch.stack([Y, Y], 1).double()),
    "labels-int": dict(labels=Y.long()),
    "logits-missing": dict(logits=None),
    "logits-B3": dict(logits=torch.randn(B, 3, dtype=torch.float64)),
    "logits-short": dict(logits=torch.randn(B - 1, 2, dtype=torch.float64)),
    "logits-float32": dict(logits=torch.randn(B, 2)),
    "term_mask-8": dict(term_mask=8),
    "term_mask-negative": dict(term_mask=-1),
}


def score_forward_op():
    need_cpu_backend()
    backends.resolve("cpu", "cpu")  # loads the C++ library: torch.ops.fusedloss
    return torch.ops.fusedloss.score_forward.default


def test_op_accepts_well_formed_arguments():
    op = score_forward_op()
    args = op_args()
    values, total, counts, rank_scale, status = op(*(args[k] for k in ORDER))
    assert values.shape == (3,) and total.shape == () and counts.shape == (B,) and int(status) == 0
    expected = combined(args["scores"], args["logits"], args["labels"], backend="reference")[0]
    assert_same(total, expected, "score_forward")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_op_rejects_malformed_arguments(case):
    op = score_forward_op()
    args = {**op_args(), **MALFORMED[case]}
    with pytest.raises(RuntimeError) as info:
        op(*(args[k] for k in ORDER))
    assert "score" in str(info.value), str(info.value)
