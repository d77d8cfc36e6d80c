"""Score operators as torch sees them: opcheck, gradcheck, torch.compile, the fail-fast check,
a million scores against an independent O(B log B) computation, launches and syncs."""

import warnings

import numpy as np
import pytest
import torch
from conftest import FUSED, HAS_CUDA, assert_close, interpreted
from test_score import make_inputs

import fusedloss
from fusedloss import backends
from fusedloss import functional as F
from fusedloss.score import config as score_config
from fusedloss.score import layout as score_layout


def ops_of(backend, device):
    backends.resolve(backend, device)  # (loads or defines the operators)
    namespace = torch.ops.fusedloss_triton if backend == "triton" else torch.ops.fusedloss
    return namespace.score_forward.default, namespace.score_backward.default


@pytest.mark.parametrize("terms", [score_layout.ALL_TERMS, score_layout.RANKING_ONLY], ids=["all", "ranking"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_opcheck(fused, dtype, terms):
    backend, device = fused
    forward, backward = ops_of(backend, device)
    scores, logits, labels = make_inputs(40, dtype, device)
    settings = score_config.ScoreConfig.build().settings().to(device)
    logits = logits if terms == score_layout.ALL_TERMS else None
    for smooth_l1, ranking_sum in ((False, False), (True, True)):
        args = (scores, logits, labels, settings, terms, smooth_l1, ranking_sum)
        grad_args = (scores.clone().requires_grad_(), None if logits is None else logits.clone().requires_grad_())
        torch.library.opcheck(forward, grad_args + args[2:])
        out_terms, total, counts, rank_scale, _ = forward(*args)
        torch.library.opcheck(backward, (torch.randn_like(out_terms), torch.randn_like(total), counts, rank_scale)
                              + args + ([True, True],))


@pytest.mark.parametrize("regression_type", ["mse", "smoothl1"])
def test_gradcheck_cpp_cpu(regression_type):
    if backends.unavailable_reason("cpu", "cpu"):
        pytest.skip(backends.unavailable_reason("cpu", "cpu"))
    # Distinct scores away from the hinge's kink (gradcheck differentiates numerically).
    scores = torch.linspace(-0.4, 1.3, 300, dtype=torch.float64)[torch.randperm(300)][:150].clone()
    _, logits, labels = make_inputs(150, torch.float64, "cpu")
    scores.requires_grad_()
    logits.requires_grad_()

    def fn(s, lg):
        _, terms = F.combined_loss(s, lg, labels, regression_type=regression_type, backend="cpu", check_finite=False)
        return torch.stack([terms[k] for k in ("regression", "classification", "ranking", "total")])

    assert torch.autograd.gradcheck(fn, (scores, logits))
    assert torch.autograd.gradcheck(lambda s: F.all_pairs_margin_ranking_loss(s, labels, reduction="sum", backend="cpu"),
                                    (scores,))


def test_gradcheck_triton(fused):
    backend, device = fused
    if backend != "triton":
        pytest.skip("Triton only (the C++ backends are covered above)")
    scores = torch.linspace(-0.4, 1.3, 40, dtype=torch.float64, device=device)[::2].clone().requires_grad_()
    _, logits, labels = make_inputs(20, torch.float64, device)
    logits.requires_grad_()

    def fn(s, lg):
        _, terms = F.combined_loss(s, lg, labels, backend=backend, check_finite=False)
        return torch.stack(list(terms.values()))

    assert torch.autograd.gradcheck(fn, (scores, logits))


def compile_cases():
    out = [p for p in FUSED if not (p.values[0][0] == "triton" and p.values[0][1] == "cpu")]
    return out + [pytest.param(("reference", "cpu"), id="reference-cpu")]


@pytest.mark.parametrize("check_finite", [False, True], ids=["unchecked", "checked"])
@pytest.mark.parametrize("case", compile_cases())
def test_compile_fullgraph(case, check_finite):
    """A compiled TIGAS training step with no graph break (the check is an operator); weight and
    margin changes recompile nothing; a NaN still raises inside the compiled step."""
    backend, device = case
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 3).to(device)
    loss_fn = fusedloss.CombinedLoss(check_finite=check_finite, backend=backend).to(device)
    x = torch.randn(64, 16, device=device)
    labels = (torch.rand(64, device=device) > 0.5).float()

    def loss_of_batch(x):
        out = model(x)
        total, terms = loss_fn(torch.sigmoid(out[:, :1]), out[:, 1:], labels)
        return total + 0.1 * terms["ranking"]

    def step(compute, x=x):
        model.zero_grad()
        loss = compute(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(loss_of_batch)
    compiled = torch.compile(loss_of_batch, fullgraph=True)
    got = step(compiled)
    assert_close(got[0], eager[0], torch.float32)
    for g, e in zip(got[1], eager[1]):
        assert_close(g, e, torch.float32, grad=True)
    if backend != "reference":  # (the reference reads the Python weights: a change is a new constant there)
        loss_fn.ranking_weight, loss_fn.margin = 0.7, 0.2
        with torch.compiler.set_stance("fail_on_recompile"):
            got2 = step(compiled)
        assert_close(got2[0], step(loss_of_batch)[0], torch.float32)
        assert not torch.allclose(got2[0], got[0])
    if check_finite:
        bad = x.clone()
        bad[3, 0] = float("nan")
        with pytest.raises(RuntimeError, match="NaN/Inf detected in scores"):
            step(compiled, bad)


BACKENDS_HERE = [p for p in FUSED] + [pytest.param(("reference", "cpu"), id="reference-cpu")]


@pytest.mark.parametrize("case", BACKENDS_HERE)
def test_check_finite_names_the_culprit(case):
    backend, device = case
    scores, logits, labels = make_inputs(300, torch.float32, device)
    cases = []
    for name, value in (("scores", float("nan")), ("scores", float("inf")), ("logits", float("-inf")),
                        ("logits", float("nan"))):
        s, lg = scores.clone(), logits.clone()
        (s if name == "scores" else lg).view(-1)[17] = value
        cases.append((name, s, lg))
    big = scores.clone()
    big[5] = 3e38  # finite, but its square overflows float32: the total is Inf
    cases.append(("total", big, logits))
    for name, s, lg in cases:
        with pytest.raises(RuntimeError, match=f"NaN/Inf detected in {name}"):
            F.combined_loss(s, lg, labels, backend=backend)
        with pytest.raises(RuntimeError, match=f"NaN/Inf detected in {name}"):
            fusedloss.CombinedLoss(backend=backend)(s, lg, labels)
        total, _ = F.combined_loss(s, lg, labels, check_finite=False, backend=backend)
        if name != "logits":  # (an infinite logit of the other class gives a finite cross-entropy)
            assert not torch.isfinite(total)
    total, terms = F.combined_loss(scores, logits, labels, backend=backend)
    assert torch.isfinite(total)


def test_nonfinite_scores_never_crash_the_search(fused, monkeypatch):
    """check_finite=False with NaN and Inf among the scores: a non-finite result, no crash or hang."""
    backend, device = fused
    if backend == "triton":
        import fusedloss.score.triton as triton_score

        monkeypatch.setattr(triton_score, "ALL_PAIRS_MAX", 0)
    scores, logits, labels = make_inputs(2000, torch.float32, device)
    scores[::7] = float("nan")
    scores[1::11] = float("inf")
    scores[2::13] = float("-inf")
    total, terms = F.combined_loss(scores.requires_grad_(), logits, labels, check_finite=False, backend=backend)
    total.backward()
    assert not torch.isfinite(terms["ranking"])


def independent_ranking(scores: np.ndarray, real: np.ndarray, margin: float):
    """(sum of the hinge over all pairs, d sum / d score, pairs) by sorting and prefix sums, with
    numpy (not the library's searches): for a real score s, the active fakes are those >= s - m
    (exact for the test's dyadic scores), whose sum comes from a suffix sum; for a fake score f,
    the active reals are those <= f + m."""
    fakes = np.sort(scores[~real])
    reals = np.sort(scores[real])
    suffix = np.concatenate([np.cumsum(fakes[::-1])[::-1], [0.0]])
    first = np.searchsorted(fakes, scores[real] - margin, side="left")
    count_real = len(fakes) - first
    total = np.sum(count_real * (margin - scores[real]) + suffix[first])
    count_fake = np.searchsorted(reals, scores[~real] + margin, side="right")
    grad = np.zeros_like(scores)
    grad[real] = -count_real
    grad[~real] = count_fake
    return total, grad, len(fakes) * len(reals)


def million_cases():
    out = []
    for p in FUSED:
        backend, device = p.values[0]
        marks = list(p.marks)
        if interpreted(backend, device):
            marks.append(pytest.mark.skip(reason="the Triton interpreter is too slow for 10^6 scores"))
        out.append(pytest.param((backend, device), id=p.id, marks=marks))
    return out


@pytest.mark.parametrize("B,dtype", [(1_000_000, torch.float32), (100_000, torch.float64)], ids=["1e6-fp32", "1e5-fp64"])
@pytest.mark.parametrize("case", million_cases())
def test_a_million_scores_against_an_independent_computation(case, B, dtype):
    """B = 1,000,000, half real: the fused forward and backward against numpy's O(B log B) sums
    (and 100,000 float64 scores, whose sort keys are 64-bit). Scores are multiples of 2^-12 in
    [0, 1) so the arithmetic is exact and the activity test has no rounding; many scores repeat
    and many pairs sit exactly at the hinge."""
    backend, device = case
    margin = 0.5
    rng = np.random.default_rng(0)
    scores_np = rng.integers(0, 4096, B) / 4096.0
    real_np = rng.random(B) < 0.5
    scores = torch.tensor(scores_np, dtype=dtype, device=device, requires_grad=True)
    labels = torch.tensor(real_np, dtype=dtype, device=device)
    logits = torch.zeros(B, 2, dtype=dtype, device=device)
    total, terms = F.combined_loss(scores, logits, labels, regression_weight=0.0, classification_weight=0.0,
                                   ranking_weight=1.0, margin=margin, backend=backend)
    total.backward()
    hinge_sum, grad_sum, pairs = independent_ranking(scores_np, real_np, margin)
    assert terms["ranking"].item() == pytest.approx(hinge_sum / pairs, rel=1e-6)
    expected_grad = torch.tensor(grad_sum / pairs, dtype=dtype)
    torch.testing.assert_close(scores.grad.cpu(), expected_grad, rtol=1e-6, atol=0)
    ranking_sum = F.all_pairs_margin_ranking_loss(scores.detach(), labels, margin, "sum", backend=backend)
    assert ranking_sum.item() == pytest.approx(hinge_sum, rel=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("B", [16, 4096, 100_000])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_sync_unless_checked(backend, B):
    """check_finite=False never syncs; check_finite=True syncs exactly once."""
    if backends.unavailable_reason(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    scores, logits, labels = make_inputs(B, torch.float32, "cuda")
    scores.requires_grad_()
    for check_finite in (False, True):
        loss_fn = fusedloss.CombinedLoss(check_finite=check_finite, backend=backend).cuda()
        loss_fn(scores, logits, labels)[0].backward()  # warm-up
        scores.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as syncs:
                warnings.simplefilter("always")
                loss_fn(scores, logits, labels)[0].backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in syncs if "synchroniz" in str(w.message)]
        assert len(syncs) == (1 if check_finite else 0), [str(w.message) for w in syncs]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_two_launches_at_small_batches(backend):
    """B = 256, unchecked: forward + backward is one forward and one backward kernel."""
    if backends.unavailable_reason(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    loss_fn = fusedloss.CombinedLoss(check_finite=False, backend=backend).cuda()
    scores, logits, labels = make_inputs(256, torch.float32, "cuda")
    scores.requires_grad_()
    loss_fn(scores, logits, labels)[0].backward()
    scores.grad = None
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss_fn(scores, logits, labels)[0].backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
    assert len(kernels) <= 2, [e.name for e in kernels]
