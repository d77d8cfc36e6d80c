"""Score loss (TIGAS): every fused backend against the reference pair matrix, values and gradients."""

import pytest
import torch
from conftest import FUSED, assert_close, interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss import functional as F

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TERMS = ("regression", "classification", "ranking", "total")


def make_inputs(B, dtype, device, *, real_fraction=0.5, seed=0, grid=None, noncontiguous=False):
    """(scores [B], logits [B, 2], labels [B]). ``grid``: scores on multiples of it (ties, and
    pairs exactly at the hinge); labels in [0, 1] with (label > 0.5) true for ``real_fraction``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, generator=g, dtype=torch.float64) * 1.5 - 0.25
    if grid is not None:
        scores = torch.round(scores / grid) * grid
    logits = torch.randn(B, 2, generator=g, dtype=torch.float64) * 2
    real = torch.rand(B, generator=g, dtype=torch.float64) < real_fraction
    labels = torch.where(real, 0.5 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64) + 1e-3,
                         0.5 * torch.rand(B, generator=g, dtype=torch.float64)).clamp(max=1.0)
    labels[real & (torch.arange(B) % 7 == 0)] = 1.0
    labels[~real & (torch.arange(B) % 5 == 0)] = 0.5  # exactly 0.5 is fake
    out = [scores.to(dtype=dtype, device=device), logits.to(dtype=dtype, device=device),
           labels.to(dtype=dtype, device=device)]
    if noncontiguous:  # strided scores and labels, column-major logits
        out[0] = torch.stack([out[0], out[0]], 1)[:, 1]
        out[1] = out[1].T.contiguous().T
        out[2] = torch.stack([out[2], out[2]], 1)[:, 0]
        assert not any(x.is_contiguous() for x in out) or B <= 1
    return out


def run(backend, inputs, *, ranking_only=False, check_finite=True, **config):
    """(terms, leaves): the loss on fresh leaves (scores and logits require grad)."""
    scores, logits, labels = (x.detach().clone().requires_grad_(i < 2) for i, x in enumerate(inputs))
    if ranking_only:
        ranking = F.all_pairs_margin_ranking_loss(scores, labels, backend=backend, **config)
        return {"ranking": ranking}, (scores, logits)
    _, terms = F.combined_loss(scores, logits, labels, backend=backend, check_finite=check_finite, **config)
    return terms, (scores, logits)


def compare(backend, device, dtype, B=None, *, inputs=None, upstream="mixed", ranking_only=False, **config):
    """Fused vs reference on the same data: every term and the gradients of scores and logits."""
    inputs = inputs if inputs is not None else make_inputs(B, dtype, device)
    f_terms, f_leaves = run(backend, inputs, ranking_only=ranking_only, **config)
    r_terms, r_leaves = run("reference", inputs, ranking_only=ranking_only, **config)
    assert list(f_terms) == list(r_terms)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in r_terms:
        assert f_terms[name].shape == () and f_terms[name].dtype == out_dtype, name
        assert_close(f_terms[name], r_terms[name], dtype, msg=name)
    names = list(r_terms)

    def objective(terms):
        if upstream == "total":
            return terms[names[-1]] * 1.7
        return sum(c * terms[n] for c, n in zip((0.9, -1.3, 2.1, 1.7), names))

    objective(f_terms).backward()
    objective(r_terms).backward()
    for f, r, name in zip(f_leaves, r_leaves, ("scores", "logits")):
        if r.grad is None:
            assert f.grad is None or not f.grad.any(), f"unexpected gradient for {name}"
            continue
        assert f.grad is not None and f.grad.dtype == dtype, name
        assert_close(f.grad, r.grad, dtype, grad=True, msg=f"d/d{name}")
    return f_terms


def sizes(backend, device):
    """Batch sizes: the all-pairs and the sorted paths of every backend (small when interpreted)."""
    return (1, 2, 16, 257, 700) if interpreted(backend, device) else (1, 2, 16, 257, 5000)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(fused, dtype):
    backend, device = fused
    for B in sizes(backend, device):
        compare(backend, device, dtype, inputs=make_inputs(B, dtype, device, seed=B))


@pytest.mark.parametrize("regression_type", ["mse", "smoothl1"])
@pytest.mark.parametrize("upstream", ["total", "mixed"])
def test_regression_types_and_upstream_gradients(fused, regression_type, upstream):
    """Both regression types with errors on both sides of smooth-L1's |d| = 1; the gradient of
    the total times 1.7, and of a mix of the terms (grad_output != 1)."""
    backend, device = fused
    inputs = make_inputs(300, torch.float64, device)
    inputs[0] = inputs[0] * 3 - 1
    compare(backend, device, torch.float64, inputs=inputs, upstream=upstream, regression_type=regression_type,
            regression_weight=1.3, classification_weight=0.7, ranking_weight=-0.4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_exactly_at_the_hinge_and_duplicates(fused, dtype):
    """Scores on multiples of 1/8 with margin 0.5: many pairs sit exactly at m - (s_i - s_j) = 0,
    which is active (margin_ranking_loss's gradient), and many scores are equal."""
    backend, device = fused
    for B in sizes(backend, device)[2:]:
        inputs = make_inputs(B, dtype, device, grid=0.125, seed=B)
        s, real = inputs[0].double(), inputs[2] > 0.5
        at_hinge = (0.5 - (s[real][:, None] - s[~real][None, :])) == 0
        assert at_hinge.sum() > 0 and s.unique().numel() < B
        compare(backend, device, dtype, inputs=inputs)
        compare(backend, device, dtype, inputs=inputs, ranking_only=True, reduction="sum")


@pytest.mark.parametrize("real_fraction", [0.0, 1.0], ids=["all-fake", "all-real"])
def test_one_class_batches(fused, real_fraction):
    """No pairs: the ranking is 0 and passes no gradient (no NaN)."""
    backend, device = fused
    for B in (1, 5, 400):
        inputs = make_inputs(B, torch.float32, device, real_fraction=real_fraction)
        terms = compare(backend, device, torch.float32, inputs=inputs)
        assert terms["ranking"].item() == 0.0
        ranking = compare(backend, device, torch.float32, inputs=inputs, ranking_only=True)["ranking"]
        assert ranking.item() == 0.0


def test_one_real_and_one_fake(fused):
    backend, device = fused
    for real_score, fake_score, expected in ((0.2, 0.4, 0.7), (0.9, 0.1, 0.0), (0.75, 0.25, 0.0)):
        scores = torch.tensor([fake_score, real_score], device=device, dtype=torch.float64)
        labels = torch.tensor([0.0, 1.0], device=device, dtype=torch.float64)
        logits = torch.zeros(2, 2, device=device, dtype=torch.float64)
        terms = compare(backend, device, torch.float64, inputs=[scores, logits, labels])
        assert terms["ranking"].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shapes", [("B", "B1"), ("B1", "B"), ("B1", "B1")])
def test_scores_and_labels_as_b_or_b1(fused, shapes):
    """[B] and [B, 1] in any mix are read as [B] (never broadcast to [B, B]); the gradient keeps
    the scores' shape."""
    backend, device = fused
    scores, logits, labels = make_inputs(50, torch.float32, device)
    shaped = lambda x, s: x[:, None] if s == "B1" else x
    compare(backend, device, torch.float32, inputs=[shaped(scores, shapes[0]), logits, shaped(labels, shapes[1])])
    s = shaped(scores, shapes[0]).clone().requires_grad_()
    total, _ = F.combined_loss(s, logits, shaped(labels, shapes[1]), backend=backend)
    total.backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(fused, dtype):
    backend, device = fused
    for B in sizes(backend, device)[2:]:
        compare(backend, device, dtype, inputs=make_inputs(B, dtype, device, noncontiguous=True, seed=B))


@pytest.mark.parametrize("scores_dtype,labels_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                                                       (torch.float32, torch.bfloat16), (torch.float64, torch.float16)],
                         ids=str)
def test_labels_of_another_dtype(fused, scores_dtype, labels_dtype):
    """Labels may have any float dtype (e.g. float32 labels with bfloat16 scores under autocast)."""
    backend, device = fused
    scores, logits, labels = make_inputs(300, scores_dtype, device)
    labels = make_inputs(300, torch.float64, device)[2].to(labels_dtype)
    compare(backend, device, scores_dtype, inputs=[scores, logits, labels])


@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_labels_next_to_one_half(fused, scores_dtype):
    """The class test is label > 0.5 in the labels' own dtype (as the reference compares): a float64
    label just above 0.5 is real even where it rounds to 0.5 in the scores' arithmetic type."""
    backend, device = fused
    scores, logits, _ = make_inputs(40, scores_dtype, device, seed=3)
    labels = torch.tensor([0.5 + 1e-12, 0.5, 0.5 - 1e-12, 0.0, 1.0] * 8, dtype=torch.float64, device=device)
    compare(backend, device, scores_dtype, inputs=[scores, logits, labels])


@pytest.mark.parametrize("margin", [0.0, -0.3, 2.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ranking_alone(fused, margin, reduction):
    backend, device = fused
    for B in sizes(backend, device)[2:]:
        compare(backend, device, torch.float64, inputs=make_inputs(B, torch.float64, device, seed=B), ranking_only=True,
                margin=margin, reduction=reduction)
    compare(backend, device, torch.float64, 200, margin=margin)


def test_sorted_path_of_triton(fused, monkeypatch):
    """The Triton forward past ALL_PAIRS_MAX (keys, sort, binary search), at small sizes."""
    backend, device = fused
    if backend != "triton":
        pytest.skip("Triton only")
    import fusedloss.score.triton as triton_score

    monkeypatch.setattr(triton_score, "ALL_PAIRS_MAX", 0)
    for B in (1, 2, 3, 64, 257):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            compare(backend, device, dtype, inputs=make_inputs(B, dtype, device, grid=0.125, seed=B))
        compare(backend, device, torch.float64, inputs=make_inputs(B, torch.float64, device, real_fraction=1.0))
        compare(backend, device, torch.float32, inputs=make_inputs(B, torch.float32, device, noncontiguous=True),
                ranking_only=True, reduction="sum")


def test_empty_batch(fused):
    backend, device = fused
    scores = torch.zeros(0, device=device, requires_grad=True)
    total, terms = F.combined_loss(scores, torch.zeros(0, 2, device=device), torch.zeros(0, device=device),
                                   backend=backend)
    assert all(terms[k].item() == 0.0 for k in TERMS)
    total.backward()
    assert scores.grad.shape == (0,)


@pytest.mark.parametrize("logit", ["+inf class", "+inf other", "-inf class", "-inf other"])
def test_an_infinite_logit_like_the_reference(fused, logit):
    """A +inf logit makes torch's cross-entropy and its gradient NaN (log_softmax: inf - inf); a
    -inf one gives 0 or inf and finite gradients. Unchecked (check_finite=False), the fused loss
    gives the same."""
    backend, device = fused
    scores, logits, labels = make_inputs(8, torch.float32, device)
    row = 3
    column = int(labels[row] > 0.5) if logit.endswith("class") else 1 - int(labels[row] > 0.5)
    logits[row, column] = float("inf") if logit.startswith("+") else float("-inf")
    (f_terms, f_leaves), (r_terms, r_leaves) = (run(b, (scores, logits, labels), check_finite=False)
                                                for b in (backend, "reference"))
    f_terms["classification"].backward()
    r_terms["classification"].backward()
    torch.testing.assert_close(f_terms["classification"].cpu().double(), r_terms["classification"].cpu().double(),
                               equal_nan=True)
    torch.testing.assert_close(f_leaves[1].grad.cpu(), r_leaves[1].grad.cpu(), equal_nan=True)


def test_deterministic(fused):
    backend, device = fused
    inputs = make_inputs(700 if interpreted(backend, device) else 20000, torch.float32, device)
    first = run(backend, inputs)[0]
    second = run(backend, inputs)[0]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_module_is_the_drop_in(fused):
    """TIGAS: total_loss, loss_dict = loss_fn(scores=out['score'].squeeze(-1), logits=..., labels=...);
    weights and the margin change as attributes, which replace the settings table (copy on write)."""
    backend, device = fused
    scores, logits, labels = make_inputs(64, torch.float32, device)
    loss_fn = fusedloss.CombinedLoss(regression_type="smoothl1", backend=backend)
    total, loss_dict = loss_fn(scores=scores[:, None].squeeze(-1), logits=logits, labels=labels)
    assert list(loss_dict) == list(TERMS) and loss_dict["total"] is total
    expected = F.combined_loss(scores, logits, labels, regression_type="smoothl1", backend="reference")[1]
    for k in TERMS:
        assert_close(loss_dict[k], expected[k], torch.float32, msg=k)
    buffer = loss_fn.settings
    loss_fn.regression_weight, loss_fn.ranking_weight, loss_fn.margin = 1.5, 0.1, 0.25
    assert loss_fn.settings is not buffer and loss_fn.margin == 0.25 and loss_fn.ranking_weight == 0.1
    changed = loss_fn(scores, logits, labels)[1]
    expected = F.combined_loss(scores, logits, labels, regression_weight=1.5, ranking_weight=0.1, margin=0.25,
                               regression_type="smoothl1", backend="reference")[1]
    for k in TERMS:
        assert_close(changed[k], expected[k], torch.float32, msg=k)
    assert "ranking_weight=0.1" in repr(loss_fn) and "smoothl1" in repr(loss_fn)

    ranking_fn = fusedloss.AllPairsMarginRankingLoss(margin=0.3, reduction="sum", backend=backend)
    ranking = ranking_fn(scores, labels)
    assert_close(ranking, F.all_pairs_margin_ranking_loss(scores, labels, 0.3, "sum", backend="reference"),
                 torch.float32)
    ranking_fn.margin = 0.6
    assert_close(ranking_fn(scores, labels),
                 F.all_pairs_margin_ranking_loss(scores, labels, 0.6, "sum", backend="reference"), torch.float32)
    assert "reduction='sum'" in repr(ranking_fn)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_problems_match_reference(data):
    runnable = [p.values[0] for p in FUSED if not p.marks]
    backend, device = data.draw(st.sampled_from(runnable), label="backend")
    B = data.draw(st.integers(1, 300), label="B")
    inputs = make_inputs(B, torch.float64, device, seed=data.draw(st.integers(0, 1000)),
                         real_fraction=data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
                         grid=data.draw(st.sampled_from([None, 0.125, 0.5])))
    weight = st.sampled_from([0.0, 0.3, 1.0, -0.5])
    if data.draw(st.booleans(), label="ranking_only"):
        compare(backend, device, torch.float64, inputs=inputs, ranking_only=True,
                margin=data.draw(st.sampled_from([0.0, 0.5, 0.25, -1.0])),
                reduction=data.draw(st.sampled_from(["mean", "sum"])))
    else:
        compare(backend, device, torch.float64, inputs=inputs, upstream=data.draw(st.sampled_from(["total", "mixed"])),
                regression_weight=data.draw(weight), classification_weight=data.draw(weight),
                ranking_weight=data.draw(weight), margin=data.draw(st.sampled_from([0.0, 0.5, 0.25, -1.0])),
                regression_type=data.draw(st.sampled_from(["mse", "smoothl1"])))
