"""PVA loss: every fused backend against the reference, values and gradients."""

import numpy as np
import pytest
import torch
from conftest import FUSED, assert_close, interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss import functional as F
from fusedloss.pva.config import DITTO_PARTS

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_inputs(B, L, D, dtype, device, *, noncontiguous=False, seed=0):
    """Base tensors and ``view(bases) -> (pred [B, L, D], target [B, L, D], cond_frame [B, D])``.

    With noncontiguous, the views are a transpose (stride_d != 1), a slice along time
    (stride_t = 2D) and a transposed cond_frame; gradients are compared on the bases.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, D, L), (B, 2 * L, D), (D, B)] if noncontiguous else [(B, L, D), (B, L, D), (B, D)]
    bases = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) for shape in shapes]

    def view(pred, target, cond):
        if noncontiguous:
            return pred.transpose(1, 2), target[:, ::2], cond.t()
        return pred, target, cond

    return bases, view


def inputs(B, L, D, dtype, device, seed=0):
    bases, view = make_inputs(B, L, D, dtype, device, seed=seed)
    return view(*bases)


def compare(backend, device, dtype, B, L, D, *, noncontiguous=False, grad_of=("pred", "target", "cond"),
            upstream="mixed", seed=0, **config):
    """Run fused and reference on the same data; compare terms, total and input gradients.

    upstream: "mixed" backpropagates 1.7 * total + sum_i c_i * term_i (grad_output != 1 and
    different per term), "total" only the total, "terms" sum(terms.values()) as Ditto's trainer.
    """
    bases, view = make_inputs(B, L, D, dtype, device, noncontiguous=noncontiguous, seed=seed)
    if "dim_ws" in config and config["dim_ws"] is True:
        config["dim_ws"] = torch.rand(D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    names = ("pred", "target", "cond")
    runs = {}
    for which in (backend, "reference"):
        leaves = [x.detach().clone().requires_grad_(n in grad_of) for x, n in zip(bases, names)]
        args = view(*leaves)
        assert noncontiguous != any(x.is_contiguous() for x in args)
        total, terms = F.pva_loss(*args, backend=which, **config)
        runs[which] = (leaves, total, terms)
    (f_in, f_total, f_terms), (r_in, r_total, r_terms) = runs[backend], runs["reference"]

    assert list(f_terms) == list(r_terms)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert f_total.dtype == out_dtype and f_total.shape == ()
    for name in r_terms:
        assert f_terms[name].shape == ()
        assert_close(f_terms[name], r_terms[name].to(out_dtype), dtype, msg=name)
    assert_close(f_total, r_total.to(out_dtype), dtype, msg="total")

    if not grad_of:
        assert not f_total.requires_grad
        return f_terms
    coefs = torch.linspace(-0.9, 1.3, len(r_terms), dtype=torch.float64).tolist()

    def objective(total, terms):
        if upstream == "total":
            return total * 1.7
        if upstream == "terms":
            return sum(terms.values())
        return 1.7 * total + sum(c * t for c, t in zip(coefs, terms.values()))

    objective(f_total, f_terms).backward()
    objective(r_total, r_terms).backward()
    for x_f, x_r, n in zip(f_in, r_in, names):
        if n in grad_of and (n != "cond" or config.get("use_last_frame_loss")):
            assert x_f.grad is not None, f"no gradient for {n}"
            assert x_f.grad.dtype == dtype and x_f.grad.shape == x_f.shape
            assert_close(x_f.grad, x_r.grad, dtype, grad=True, msg=f"d/d{n}")
        else:
            assert x_f.grad is None or not x_f.grad.any(), n
    return f_terms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ditto_shape_every_term(fused, dtype):
    """Ditto's [B, 80, 265] with its six parts, dim_ws, last-frame and reg terms."""
    backend, device = fused
    B = 2 if interpreted(backend, device) else 8
    terms = compare(backend, device, dtype, B, 80, 265, dim_ws=True,
                    use_last_frame_loss=True, use_reg_loss=True)
    assert len(terms) == 6 * 5 and list(terms)[:5] == ["scale_P", "scale_V", "scale_A", "scale_L", "scale_R"]


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
@pytest.mark.parametrize("last,reg", [(False, False), (True, False), (False, True), (True, True)])
def test_options(fused, loss_type, last, reg):
    backend, device = fused
    parts = {"a": (0, 9, 1.0), "b": (9, 0, 0.5)}
    compare(backend, device, torch.float64, 3, 9, 21, part_w_dict=parts, loss_type=loss_type,
            use_last_frame_loss=last, use_reg_loss=reg, reg_weights={"a": 0.3})


@pytest.mark.parametrize(
    "parts",
    [
        {"all": (0, 0, 1.0)},                                        # Ditto's convention: whole D
        {"x": (0, 20, 1.0), "y": (10, 30, 2.0), "z": (5, 15, -0.5)}, # overlapping, negative weight
        {"lo": (2, 4, 1.0), "hi": (30, 37, 3.0)},                     # gaps left uncovered
        {"one": (36, 37, 1.0), "first": (-3, 1, 2.0)},                # single columns, start < 0
        {f"p{i}": (i, i + 1 + i % 3, 0.1 * i) for i in range(33)},   # many parts
    ],
    ids=["whole", "overlap", "gaps", "single-columns", "many"],
)
def test_parts(fused, parts):
    backend, device = fused
    compare(backend, device, torch.float64, 2, 6, 37, part_w_dict=parts, dim_ws=True,
            use_last_frame_loss=True, use_reg_loss=True)


@pytest.mark.parametrize("L", [1, 2, 3, 17])
def test_short_and_odd_sequences(fused, L):
    """L = 1 has no velocity and L = 2 no acceleration: those terms are 0 with no gradient."""
    backend, device = fused
    parts = {"a": (0, 3, 1.0), "b": (3, 0, 2.0)}
    terms = compare(backend, device, torch.float64, 3, L, 7, part_w_dict=parts,
                    use_last_frame_loss=True, use_reg_loss=True)
    if L == 1:
        assert terms["a_V"].item() == 0.0 and terms["b_A"].item() == 0.0
    if L == 2:
        assert terms["a_A"].item() == 0.0 and terms["a_V"].item() != 0.0


@pytest.mark.parametrize("D", [1, 33, 65, 130])
def test_odd_widths(fused, D):
    backend, device = fused
    compare(backend, device, torch.float32, 2, 5, D, part_w_dict={"all": (0, D, 1.5)}, dim_ws=True,
            use_last_frame_loss=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(fused, dtype):
    backend, device = fused
    compare(backend, device, dtype, 3, 10, 40, noncontiguous=True,
            part_w_dict={"a": (0, 17, 1.0), "b": (11, 40, 0.7)}, dim_ws=True,
            use_last_frame_loss=True, use_reg_loss=True)


def test_cpu_large_problem_whole_rows():
    """Inputs above the CPU kernels' prefetch size (4 MiB) run as whole rows, prefetching the next
    batch element: the same bits as the same values through the small-problem path (strided views,
    copied per column block), and the reference's values."""
    if fusedloss.backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ CPU backend is not available")
    B, L, D = 2, 2048, 265  # 8.7 MB of pred and target in float32
    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(B, L, D, generator=g) for _ in range(2))
    cond = torch.randn(B, D, generator=g)
    config = dict(use_last_frame_loss=True, use_reg_loss=True, dim_ws=torch.linspace(0.5, 1.5, D, dtype=torch.float64))
    runs = []
    for strided in (False, True):
        bases = [(x.transpose(1, 2) if strided else x).clone().requires_grad_() for x in (pred, target)]
        p, q = (x.transpose(1, 2) if strided else x for x in bases)
        total, terms = F.pva_loss(p, q, cond, backend="cpu", **config)
        (1.7 * total + terms["yaw_A"]).backward()
        runs.append((total, *(x.grad.transpose(1, 2) if strided else x.grad for x in bases)))
    assert not runs[1][0].isnan() and torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][2], runs[1][2])
    p = pred.clone().requires_grad_()
    total, terms = F.pva_loss(p, target, cond, backend="reference", **config)
    (1.7 * total + terms["yaw_A"]).backward()
    assert_close(runs[0][0], total, torch.float32)
    assert_close(runs[0][1], p.grad, torch.float32, grad=True)


@pytest.mark.parametrize("upstream", ["total", "terms", "mixed"])
@pytest.mark.parametrize(
    "grad_of", [("pred",), ("target",), ("cond",), ("pred", "target", "cond"), ()], ids=lambda g: "+".join(g) or "none"
)
def test_gradient_paths(fused, grad_of, upstream):
    """Gradients reach exactly the inputs that require them, whichever outputs are used."""
    backend, device = fused
    compare(backend, device, torch.float64, 2, 7, 12, grad_of=grad_of, upstream=upstream,
            part_w_dict={"a": (0, 5, 1.0), "b": (4, 12, 2.0)}, use_last_frame_loss=True, use_reg_loss=True)


def test_l1_at_zero_error(fused):
    """|x| has gradient 0 at 0, as in torch: pred == target on some elements."""
    backend, device = fused
    pred, other, cond = inputs(2, 6, 9, torch.float64, device)
    target = pred.clone()
    target[:, :, :4] = other[:, :, :4]  # columns 4.. have exactly zero error (and differences)
    runs = []
    for which in (backend, "reference"):
        p = pred.clone().requires_grad_()
        total, _ = F.pva_loss(p, target, cond.clone(), part_w_dict={"a": (0, 9, 1.0)}, loss_type="l1",
                              use_last_frame_loss=True, backend=which)
        total.backward()
        runs.append((total, p.grad))
    assert_close(runs[0][0], runs[1][0], torch.float64)
    assert_close(runs[0][1], runs[1][1], torch.float64, grad=True)


def test_empty_batch(fused):
    backend, device = fused
    pred = torch.zeros(0, 5, 265, device=device, requires_grad=True)
    total, terms = F.pva_loss(pred, torch.zeros(0, 5, 265, device=device), backend=backend)
    assert total.item() == 0.0 and all(t.item() == 0.0 for t in terms.values())
    total.backward()
    assert pred.grad.shape == pred.shape


def test_deterministic(fused):
    """Same inputs, same bits: the reductions have a fixed order."""
    backend, device = fused
    pred, target, cond = inputs(4, 20, 70, torch.float32, device)
    first = F.pva_loss(pred, target, cond, part_w_dict={"a": (0, 70, 1.0)}, use_last_frame_loss=True, backend=backend)
    second = F.pva_loss(pred, target, cond, part_w_dict={"a": (0, 70, 1.0)}, use_last_frame_loss=True, backend=backend)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_module_matches_functional(fused):
    """PVALoss takes Ditto's arguments (lists, numpy dim_ws); a call copies its tables to the inputs'
    device and leaves the module's own where they are."""
    backend, device = fused
    D = 265
    part_w_dict = {name: [s, e, w] for name, (s, e, w) in DITTO_PARTS.items()}
    part_w_dict["exp"][2] = 2.0
    dim_ws = np.linspace(0.5, 1.5, D)
    loss_fn = fusedloss.PVALoss(part_w_dict, use_last_frame_loss=True, use_reg_loss=True, dim_ws=dim_ws,
                                backend=backend)
    pred, target, cond = inputs(2, 6, D, torch.float32, device)
    total, terms = loss_fn(pred, target, cond)
    ref_total, ref_terms = F.pva_loss(pred, target, cond, part_w_dict, True, True,
                                      torch.tensor(dim_ws, device=device), backend="reference")
    assert_close(total, ref_total, torch.float32)
    assert loss_fn.part_table.device.type == loss_fn.dim_ws.device.type == "cpu"
    assert "exp" in repr(loss_fn)

    loss_fn.set_part_weight("exp", 0.5, reg_weight=0.25)
    total2, terms2 = loss_fn(pred, target, cond)
    assert_close(terms2["exp_P"], terms["exp_P"] / 4, torch.float32)
    assert_close(terms2["exp_R"], terms["exp_R"] * 0.25 / 1e-4, torch.float32)
    assert_close(terms2["yaw_P"], terms["yaw_P"], torch.float32)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_problems_match_reference(data):
    """Random shapes, parts (overlapping, gaps), weights and options on every fused backend."""
    runnable = [p.values[0] for p in FUSED if not p.marks]
    backend, device = data.draw(st.sampled_from(runnable), label="backend")
    B = data.draw(st.integers(1, 4), label="B")
    L = data.draw(st.integers(1, 12), label="L")
    D = data.draw(st.integers(1, 40), label="D")
    n_parts = data.draw(st.integers(1, 5), label="parts")
    parts = {}
    for i in range(n_parts):
        s = data.draw(st.integers(0, D - 1))
        e = data.draw(st.integers(s + 1, D))
        parts[f"p{i}"] = (s, e, data.draw(st.floats(-2, 2, allow_nan=False)))
    compare(
        backend, device, torch.float64, B, L, D,
        part_w_dict=parts,
        loss_type=data.draw(st.sampled_from(["l2", "l1"])),
        use_last_frame_loss=data.draw(st.booleans()),
        use_reg_loss=data.draw(st.booleans()),
        dim_ws=data.draw(st.booleans()) or None,
        seed=data.draw(st.integers(0, 1000)),
    )


def test_triton_many_programs_per_column_block(monkeypatch):
    """Several row groups per column block (as on a GPU): the strided tile loops of both kernels
    and a final reduction over many programs' partials."""
    runnable = [p.values[0] for p in FUSED if not p.marks and p.values[0][0] == "triton"]
    if not runnable:
        pytest.skip("the Triton backend is not available here")
    import fusedloss.pva.triton as triton_pva

    backend, device = runnable[0]
    if device == "cpu":  # the interpreter's default budget gives one row group at D = 265
        monkeypatch.setattr(triton_pva, "program_budget", lambda device, per_sm=4: 16 * per_sm)
    block_t, block_d, col_blocks, row_groups = triton_pva._grid(torch.empty(3, 80, 265, device=device), per_sm=4)
    assert col_blocks > 1 and row_groups > 1
    compare(backend, device, torch.float64, 3, 80, 265, dim_ws=True, use_last_frame_loss=True, use_reg_loss=True)
