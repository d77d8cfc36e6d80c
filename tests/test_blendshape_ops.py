"""Blendshape operators as torch sees them: opcheck, gradcheck, torch.compile, launches, syncs."""

import pytest
import torch
from conftest import FUSED, HAS_CUDA, assert_close

import fusedloss
from fusedloss import backends
from fusedloss import functional as F
from fusedloss.blendshape import config as blendshape_config
from fusedloss.blendshape import layout as blendshape_layout
from fusedloss.blendshape.config import DUAL_STREAM_GROUPS


def op_args(device, dtype=torch.float64, *, shape=(3, 4, 9), groups=None, terms=blendshape_layout.TERMS):
    g = torch.Generator().manual_seed(0)
    pred, target, raw, prev = (torch.rand(shape, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(4))
    weights = {f"{t}_weight": (0.7 if t in terms else 0.0) for t in blendshape_layout.TERMS}
    config = blendshape_config.BlendshapeConfig.build(**weights, perceptual_groups=groups)
    matrix = torch.randn(5, shape[-1], generator=g, dtype=torch.float64).to(device)
    computed, _ = blendshape_config.computed_terms(tuple(w != 0 for w in config.weights), pred.dim(), True, True)
    group_coef = config.group_coef().to(device) if groups else None
    args = (pred, target, raw, prev, config.settings().to(device), group_coef,
            blendshape_config.landmark_gram(matrix) if "landmark" in computed else None,
            5 if "landmark" in computed else 0, blendshape_config.term_mask(computed))
    return config, matrix, args


def ops_of(backend, device):
    backends.resolve(backend, device)  # (loads or defines the operators)
    namespace = torch.ops.fusedloss_triton if backend == "triton" else torch.ops.fusedloss
    return namespace.blendshape_forward.default, namespace.blendshape_backward.default


@pytest.mark.parametrize("case", ["all", "groups", "2d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_opcheck(fused, dtype, case):
    backend, device = fused
    forward, backward = ops_of(backend, device)
    kwargs = {"all": {}, "groups": dict(groups=[([0, 2], 1.0)]), "2d": dict(shape=(5, 9))}[case]
    _, _, args = op_args(device, dtype, **kwargs)
    grad_args = tuple(x.requires_grad_() if i < 3 else x for i, x in enumerate(args[:4])) + args[4:]
    torch.library.opcheck(forward, (grad_args[0], grad_args[1], grad_args[2], args[3].detach()) + args[4:])
    terms, total, col_stats = forward(*args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(backward, (torch.randn_like(terms), torch.randn_like(total), col_stats) + detached
                          + ([True, True, True],))


@pytest.mark.parametrize("groups", [None, DUAL_STREAM_GROUPS[:1]], ids=["default", "groups"])
def test_gradcheck_cpp_cpu(groups):
    if backends.unavailable_reason("cpu", "cpu"):
        pytest.skip(backends.unavailable_reason("cpu", "cpu"))
    config, matrix, args = op_args("cpu", shape=(3, 4, 22), groups=groups)
    pred, target, raw, prev = (x.clone().requires_grad_(i < 3) for i, x in enumerate(args[:4]))

    def fn(p, t, r):
        terms = F.blendshape_loss_from_config(p, t, r, prev, config, landmark_matrix=matrix, backend="cpu")
        return torch.stack(list(terms.values()))

    assert torch.autograd.gradcheck(fn, (pred, target, raw))


def test_gradcheck_triton(fused):
    backend, device = fused
    if backend != "triton":
        pytest.skip("Triton only (the C++ backends are covered above)")
    config, matrix, args = op_args(device, shape=(2, 3, 5))
    pred, target, raw, prev = (x.clone().requires_grad_(i < 3) for i, x in enumerate(args[:4]))

    def fn(p, t, r):
        terms = F.blendshape_loss_from_config(p, t, r, prev, config, landmark_matrix=matrix.to(device), backend=backend)
        return torch.stack(list(terms.values()))

    assert torch.autograd.gradcheck(fn, (pred, target, raw))


def compile_cases():
    out = [p for p in FUSED if not (p.values[0][0] == "triton" and p.values[0][1] == "cpu")]
    return out + [pytest.param(("reference", "cpu"), id="reference-cpu")]


@pytest.mark.parametrize("case", compile_cases())
def test_compile_fullgraph_with_weight_schedules(case):
    """A compiled training step with seed 001's sequential loss; its stride/epoch weight changes
    (in-place settings updates) recompile nothing and change the numbers as eager does."""
    backend, device = case
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 52), torch.nn.Sigmoid()).to(device)
    loss_fn = fusedloss.BlendshapeLoss(temporal_weight=0.3, smoothing_weight=0.15, consistency_weight=0.3,
                                       perceptual_groups=DUAL_STREAM_GROUPS, backend=backend).to(device)
    x = torch.randn(4, 32, device=device)
    target, raw, prev = (torch.rand(4, 52, device=device) for _ in range(3))

    def loss_of_batch():
        pred = model(x)
        total, terms = loss_fn(pred, target, raw, prev, return_components=True)
        return total + 0.1 * terms["mse"]

    def step(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(loss_of_batch)
    compiled = torch.compile(loss_of_batch, fullgraph=True)
    got = step(compiled)
    assert_close(got[0], eager[0], torch.float32)
    for g, e in zip(got[1], eager[1]):
        assert_close(g, e, torch.float32, grad=True)
    if backend == "reference":
        return  # the reference reads the Python weights: a change is a new constant there
    loss_fn.perceptual_weight, loss_fn.temporal_weight, loss_fn.smoothing_weight = 0.7, 0.1, 0.05
    with torch.compiler.set_stance("fail_on_recompile"):
        got2 = step(compiled)
    assert_close(got2[0], step(loss_of_batch)[0], torch.float32)
    assert not torch.allclose(got2[0], got[0])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_two_launches_and_no_sync_at_seed_size(backend):
    """[16, 52], seed 000: forward + backward is at most two kernel launches and never syncs."""
    if backends.unavailable_reason(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    loss_fn = fusedloss.BlendshapeLoss(backend=backend).cuda()
    pred = torch.rand(16, 52, device="cuda", requires_grad=True)
    target = torch.rand(16, 52, device="cuda")
    loss_fn(pred, target).backward()  # warm-up
    pred.grad = None  # (accumulating into an existing .grad would be a kernel of autograd's own)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            loss_fn(pred, target).backward()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memset" not in e.name.lower() and "memcpy" not in e.name.lower()]
    assert len(kernels) <= 2, [e.name for e in kernels]
