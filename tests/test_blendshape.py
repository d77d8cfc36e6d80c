"""Blendshape loss: every fused backend against the reference, values and gradients."""

import pytest
import torch
from conftest import FUSED, assert_close, interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss import functional as F
from fusedloss.blendshape.config import DUAL_STREAM_GROUPS

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPTIONAL = {
    "temporal": dict(temporal_weight=0.2),
    "landmark": dict(landmark_weight=0.3),
    "smoothing": dict(smoothing_weight=0.1),
    "consistency": dict(consistency_weight=0.2),
}
ALL_TERMS = dict(temporal_weight=0.2, landmark_weight=0.3, smoothing_weight=0.1, consistency_weight=0.2)
NAMES = ("pred", "target", "raw_pred", "prev_pred")


def make_inputs(shape, dtype, device, *, noncontiguous=False, seed=0, values="uniform"):
    """Bases and view(bases) -> (pred, target, raw_pred, prev_pred) of ``shape`` (views when noncontiguous)."""
    g = torch.Generator().manual_seed(seed)
    full = tuple(reversed(shape)) if noncontiguous else tuple(shape)

    def draw():
        x = torch.rand(full, generator=g, dtype=torch.float64)
        if values == "signed":
            x = 2 * x - 1
        return x.to(dtype=dtype, device=device)

    bases = [draw() for _ in NAMES]

    def view(*xs):
        return tuple(x.permute(*reversed(range(x.dim()))) if noncontiguous else x for x in xs)

    return bases, view


def landmark_matrix(K, dtype, device, J=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(J, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype=dtype, device=device)


def compare(backend, device, dtype, shape, *, noncontiguous=False, grad_of=("pred", "target", "raw_pred", "prev_pred"),
            upstream="mixed", seed=0, values="uniform", inputs=None, **config):
    """Fused vs reference on the same data: terms, total and gradients of pred, target, raw_pred
    (prev_pred requires grad too when asked, and must get none)."""
    if inputs is None:
        bases, view = make_inputs(shape, dtype, device, noncontiguous=noncontiguous, seed=seed, values=values)
    else:
        bases, view = inputs, (lambda *xs: xs)
    if config.get("landmark_weight"):
        config.setdefault("landmark_matrix", landmark_matrix(shape[-1], dtype, device))
    runs = {}
    for which in (backend, "reference"):
        leaves = [x.detach().clone().requires_grad_(n in grad_of) for x, n in zip(bases, NAMES)]
        args = view(*leaves)
        assert noncontiguous != all(x.is_contiguous() for x in args) or shape[0] == 1
        total, terms = F.blendshape_loss(*args, backend=which, return_components=True, **config)
        runs[which] = (leaves, total, terms)
    (f_in, f_total, f_terms), (r_in, r_total, r_terms) = runs[backend], runs["reference"]
    assert list(f_terms) == list(r_terms)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in r_terms:
        assert f_terms[name].shape == () and f_terms[name].dtype == out_dtype
        assert_close(f_terms[name], r_terms[name], dtype, msg=name)
    assert f_total is f_terms["total"]
    assert f_total.requires_grad == r_total.requires_grad
    if not r_total.requires_grad:  # nothing that requires grad reaches the loss
        return f_terms
    names = [n for n in r_terms if n != "total"]
    coefs = torch.linspace(-0.8, 1.2, len(names), dtype=torch.float64).tolist()

    def objective(total, terms):
        if upstream == "total":
            return total * 1.7
        if upstream == "terms":
            return sum(terms[n] for n in names)
        return 1.7 * total + sum(c * terms[n] for c, n in zip(coefs, names))

    objective(f_total, f_terms).backward()
    objective(r_total, r_terms).backward()
    for x_f, x_r, n in zip(f_in, r_in, NAMES):
        if x_r.grad is not None and n != "prev_pred":
            assert x_f.grad is not None, f"no gradient for {n}"
            assert x_f.grad.dtype == dtype
            assert_close(x_f.grad, x_r.grad, dtype, grad=True, msg=f"d/d{n}")
        else:
            assert x_f.grad is None or not x_f.grad.any(), f"unexpected gradient for {n}"
    return f_terms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seed_000_default_terms(fused, dtype):
    """[16, 52]: MSE + L1 + perceptual (active + importance-weighted) with the seed's weights."""
    backend, device = fused
    terms = compare(backend, device, dtype, (16, 52))
    assert list(terms) == ["mse", "l1", "perceptual", "total"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_seed_001_groups(fused, dtype):
    """[4, 52] with seed 001's mouth and expression groups and its dense-stride weights."""
    backend, device = fused
    compare(backend, device, dtype, (4, 52), perceptual_groups=DUAL_STREAM_GROUPS, temporal_weight=0.3,
            smoothing_weight=0.15, consistency_weight=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_temporal_sequences(fused, dtype):
    """[B, T, 52] with the temporal term, and T = 1 (no frame differences: the term is 0)."""
    backend, device = fused
    T = 11 if interpreted(backend, device) else 64
    compare(backend, device, dtype, (3, T, 52), temporal_weight=0.2)
    terms = compare(backend, device, dtype, (3, 1, 52), temporal_weight=0.2)
    assert terms["temporal"].item() == 0.0


@pytest.mark.parametrize("term", list(OPTIONAL) + ["all"])
@pytest.mark.parametrize("shape", [(5, 52), (2, 7, 52)], ids=["2d", "3d"])
def test_every_optional_term_alone_and_together(fused, term, shape):
    backend, device = fused
    config = ALL_TERMS if term == "all" else OPTIONAL[term]
    terms = compare(backend, device, torch.float64, shape, **config)
    if term != "all" and not (term == "temporal" and len(shape) == 2):
        assert term in terms


@pytest.mark.parametrize("term", ["mse", "l1", "perceptual"])
def test_each_base_term_alone(fused, term):
    backend, device = fused
    weights = dict(mse_weight=0.0, l1_weight=0.0, perceptual_weight=0.0)
    weights[f"{term}_weight"] = 0.7
    terms = compare(backend, device, torch.float64, (6, 52), **weights)
    assert list(terms) == [term, "total"]


def test_no_terms_at_all(fused):
    backend, device = fused
    terms = compare(backend, device, torch.float64, (4, 52), mse_weight=0.0, l1_weight=0.0, perceptual_weight=0.0)
    assert list(terms) == ["total"] and terms["total"].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_exactly_at_the_threshold(fused, dtype):
    """pred and target at, just below and just above the threshold rounded to the dtype: the
    comparison is PyTorch's (tensor > Python float)."""
    backend, device = fused
    thr = 0.1
    at = torch.tensor(thr, dtype=dtype)
    below = torch.nextafter(at.double(), torch.tensor(0.0, dtype=torch.float64)).to(dtype)
    step = torch.finfo(dtype).eps * 0.1
    values = torch.tensor([at.item(), at.item() - step, at.item() + step, 0.0, 1.0, below.item()], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    pick = lambda: values[torch.randint(len(values), (8, 52), generator=g)].to(dtype=dtype, device=device)  # noqa: E731
    inputs = [pick() for _ in NAMES]
    assert (inputs[0] == at.to(device)).any() and (inputs[1] == at.to(device)).any()
    terms = compare(backend, device, dtype, (8, 52), inputs=inputs, threshold=thr, mse_weight=0.0, l1_weight=0.0)
    assert terms["perceptual"].item() > 0


@pytest.mark.parametrize("K", [1, 7, 33, 65])
def test_odd_numbers_of_blendshapes(fused, K):
    backend, device = fused
    compare(backend, device, torch.float32, (5, 3, K), perceptual_groups=[([0], 1.0), (list(range(K)), 0.5)],
            **ALL_TERMS)
    compare(backend, device, torch.float32, (5, K), landmark_weight=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_noncontiguous_inputs(fused, dtype):
    backend, device = fused
    compare(backend, device, dtype, (6, 5, 52), noncontiguous=True, **ALL_TERMS)
    compare(backend, device, dtype, (9, 52), noncontiguous=True)


@pytest.mark.parametrize("upstream", ["total", "terms", "mixed"])
@pytest.mark.parametrize(
    "grad_of", [("pred",), ("target",), ("raw_pred",), ("pred", "target", "raw_pred", "prev_pred"), ()],
    ids=lambda g: "+".join(g) or "none",
)
def test_gradient_paths(fused, grad_of, upstream):
    """Gradients reach exactly pred, target (also through the importance weights) and raw_pred
    when they require grad, never prev_pred, whichever outputs are used."""
    backend, device = fused
    compare(backend, device, torch.float64, (4, 3, 52), grad_of=grad_of, upstream=upstream, smoothing_weight=0.1,
            consistency_weight=0.2, temporal_weight=0.3)
    compare(backend, device, torch.float64, (5, 52), grad_of=grad_of, upstream=upstream, perceptual_weight=2.0)


def test_signed_values_and_l1_ties(fused):
    """Values of both signs, and pred == target or pred == raw_pred on some elements (|x|' = 0 at 0)."""
    backend, device = fused
    bases, _ = make_inputs((6, 4, 52), torch.float64, device, values="signed")
    bases[1][:, :, :10] = bases[0][:, :, :10]
    bases[2][:, :, 20:30] = bases[0][:, :, 20:30]
    compare(backend, device, torch.float64, (6, 4, 52), inputs=bases, **ALL_TERMS)


def test_empty_batch(fused):
    backend, device = fused
    pred = torch.zeros(0, 52, device=device, requires_grad=True)
    total = F.blendshape_loss(pred, torch.zeros(0, 52, device=device), backend=backend)
    assert total.item() == 0.0
    total.backward()
    assert pred.grad.shape == pred.shape


def test_deterministic(fused):
    backend, device = fused
    bases, _ = make_inputs((64, 8, 52), torch.float32, device)
    first = F.blendshape_loss(*bases, backend=backend, return_components=True, **ALL_TERMS,
                              landmark_matrix=landmark_matrix(52, torch.float32, device))
    second = F.blendshape_loss(*bases, backend=backend, return_components=True, **ALL_TERMS,
                               landmark_matrix=landmark_matrix(52, torch.float32, device))
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_module_is_the_drop_in(fused):
    """loss = loss_fn(pred, target); loss.backward() (KoeMorph's call), and the sequential trainer's
    weight schedules as attribute changes, which replace the settings table (copy on write)."""
    backend, device = fused
    loss_fn = fusedloss.BlendshapeLoss(backend=backend)
    bases, _ = make_inputs((16, 52), torch.float32, device)
    pred = bases[0].clone().requires_grad_()
    loss = loss_fn(pred, bases[1])
    loss.backward()
    assert_close(loss, F.blendshape_loss(pred, bases[1], backend="reference"), torch.float32)
    assert loss_fn.settings.device.type == "cpu"  # (a call copies the tables to the inputs' device)

    sequential = fusedloss.BlendshapeLoss(temporal_weight=0.3, smoothing_weight=0.15, consistency_weight=0.3,
                                          perceptual_groups=DUAL_STREAM_GROUPS, backend=backend)
    dense = sequential(*bases, return_components=True)[1]
    settings_buffer, before = sequential.settings, sequential.settings.clone()
    sequential.perceptual_weight, sequential.temporal_weight = 0.7, 0.1  # sparse stride
    sequential.smoothing_weight, sequential.consistency_weight = 0.05, 0.1
    assert sequential.settings is not settings_buffer and torch.equal(settings_buffer, before)
    assert sequential.perceptual_weight == 0.7 and sequential.settings[2] == 0.7
    sparse = sequential(*bases, return_components=True)[1]
    expected = F.blendshape_loss(*bases, perceptual_weight=0.7, temporal_weight=0.1, smoothing_weight=0.05,
                                 consistency_weight=0.1, perceptual_groups=DUAL_STREAM_GROUPS, backend="reference",
                                 return_components=True)[1]
    for k in expected:
        assert_close(sparse[k], expected[k], torch.float32, msg=k)
    assert_close(sparse["mse"], dense["mse"], torch.float32)
    sequential.consistency_weight = 0.0
    assert "consistency" not in sequential(*bases, return_components=True)[1]
    assert "perceptual_weight=0.7" in repr(sequential)


def test_triton_many_programs(monkeypatch):
    """Several batch groups sharing columns (their column sums combined by the last program), as on a GPU."""
    runnable = [p.values[0] for p in FUSED if not p.marks and p.values[0][0] == "triton"]
    if not runnable:
        pytest.skip("the Triton backend is not available here")
    import fusedloss.blendshape.triton as triton_blendshape

    backend, device = runnable[0]
    if device == "cpu":
        monkeypatch.setattr(triton_blendshape, "program_budget", lambda device, per_sm=4: 8 * per_sm)
    pred = torch.empty(200, 52, device=device)
    assert triton_blendshape._grid(pred, True, per_sm=4)[1] > 2
    compare(backend, device, torch.float32, (200, 52), **OPTIONAL["smoothing"])
    compare(backend, device, torch.float32, (40, 6, 52), **ALL_TERMS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_problems_match_reference(data):
    runnable = [p.values[0] for p in FUSED if not p.marks]
    backend, device = data.draw(st.sampled_from(runnable), label="backend")
    K = data.draw(st.integers(1, 70), label="K")
    shape = (data.draw(st.integers(1, 6)),) + ((data.draw(st.integers(1, 6)),) if data.draw(st.booleans()) else ()) + (K,)
    weight = st.sampled_from([0.0, 0.3, 1.0, -0.5])
    groups = None
    if data.draw(st.booleans()):
        groups = [(data.draw(st.lists(st.integers(0, K - 1), min_size=1, max_size=5)), data.draw(weight))
                  for _ in range(data.draw(st.integers(1, 3)))]
    compare(
        backend, device, torch.float64, shape, seed=data.draw(st.integers(0, 1000)),
        values=data.draw(st.sampled_from(["uniform", "signed"])),
        mse_weight=data.draw(weight), l1_weight=data.draw(weight), perceptual_weight=data.draw(weight),
        temporal_weight=data.draw(weight), landmark_weight=data.draw(weight), smoothing_weight=data.draw(weight),
        consistency_weight=data.draw(weight), threshold=data.draw(st.sampled_from([0.1, 0.5, -0.2])),
        perceptual_groups=groups,
    )
