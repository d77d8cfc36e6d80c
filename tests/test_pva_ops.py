"""PVA operators as torch sees them: opcheck, gradcheck, torch.compile, host synchronisation."""

import pytest
import torch
from conftest import HAS_CUDA, assert_close

import fusedloss
from fusedloss import backends
from fusedloss import functional as F
from fusedloss.pva import config as pva_config


def op_args(device, dtype=torch.float64, *, last=True, reg=True, dim_ws=True, B=2, L=5, D=9):
    g = torch.Generator().manual_seed(0)
    config = pva_config.PVAConfig.build({"a": (0, 4, 1.0), "b": (3, 0, 0.5)}, last, reg)
    pred, target = (torch.randn(B, L, D, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
    cond = torch.randn(B, D, generator=g, dtype=torch.float64).to(device, dtype) if last else None
    w = torch.rand(D, generator=g, dtype=torch.float64).to(device) if dim_ws else None
    return config, (pred, target, cond, config.part_table().to(device), w, config.loss_type, last, reg)


def ops_of(backend):
    backends.resolve(backend, "cpu" if backend != "cuda" else "cuda")  # (loads or defines the operators)
    if backend == "triton":
        return torch.ops.fusedloss_triton.pva_forward.default, torch.ops.fusedloss_triton.pva_backward.default
    return torch.ops.fusedloss.pva_forward.default, torch.ops.fusedloss.pva_backward.default


@pytest.mark.parametrize("last,reg,dim_ws", [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck(fused, dtype, last, reg, dim_ws):
    """Schema, fake tensors, autograd registration and AOT dispatch of both operators."""
    backend, device = fused
    forward, backward = ops_of(backend)
    _, args = op_args(device, dtype, last=last, reg=reg, dim_ws=dim_ws)
    pred, target, cond = (x.requires_grad_() if x is not None else None for x in args[:3])
    args = (pred, target, cond) + args[3:]
    torch.library.opcheck(forward, args)
    terms, _ = forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    grad_terms, grad_total = torch.randn_like(terms), torch.randn((), dtype=terms.dtype, device=terms.device)
    torch.library.opcheck(backward, (grad_terms, grad_total)
                          + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + ([True, True, last],))


def test_gradcheck_cpp_cpu():
    """Finite differences in float64 on the C++ CPU backend, every input and term."""
    if backends.unavailable_reason("cpu", "cpu"):
        pytest.skip(backends.unavailable_reason("cpu", "cpu"))
    config, args = op_args("cpu", B=2, L=5, D=7)
    pred, target, cond = (x.clone().requires_grad_() for x in args[:3])
    w = args[4]
    for loss_type in ("l2", "l1"):
        cfg = pva_config.PVAConfig(**{**config.__dict__, "loss_type": loss_type})

        def fn(p, t, c, cfg=cfg):
            total, terms = F.pva_loss_from_config(p, t, c, cfg, dim_ws=w, backend="cpu")
            return total, torch.stack(list(terms.values()))

        assert torch.autograd.gradcheck(fn, (pred, target, cond))


def test_gradcheck_triton_interpreted_or_gpu(fused):
    backend, device = fused
    if backend != "triton":
        pytest.skip("Triton only (the C++ backends are covered above)")
    config, args = op_args(device, B=2, L=4, D=5)
    pred, target, cond = (x.clone().requires_grad_() for x in args[:3])

    def fn(p, t, c):
        total, terms = F.pva_loss_from_config(p, t, c, config, dim_ws=args[4], backend=backend)
        return total, torch.stack(list(terms.values()))

    assert torch.autograd.gradcheck(fn, (pred, target, cond))


def compiled_step_case(backend, device):
    """A training step with the loss: the model's output is pred, target and cond are data."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 265, dtype=torch.float32).to(device)
    loss_fn = fusedloss.PVALoss(use_last_frame_loss=True, use_reg_loss=True,
                                dim_ws=torch.linspace(0.5, 1.5, 265), backend=backend).to(device)
    x = torch.randn(4, 12, 16, device=device)
    target = torch.randn(4, 12, 265, device=device)
    cond = torch.randn(4, 265, device=device)

    def loss_of_batch():
        total, terms = loss_fn(model(x), target, cond)
        return total + 0.5 * terms["exp_A"]

    def step(compute_loss):
        """Forward (maybe compiled, then its backward is compiled too) and backward."""
        model.zero_grad()
        loss = compute_loss()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    return model, loss_fn, loss_of_batch, step


def compile_backends():
    out = []
    for param in pytest.importorskip("conftest").FUSED:
        backend, device = param.values[0]
        if backend == "triton" and device == "cpu":
            continue  # interpreted kernels cannot be traced; covered on GPU
        out.append(param)
    out.append(pytest.param(("reference", "cpu"), id="reference-cpu"))
    return out


@pytest.mark.parametrize("case", compile_backends())
def test_compile_fullgraph_training_step(case):
    """torch.compile(fullgraph=True) traces a step with the loss, no graph break, same numbers;
    changing a part weight afterwards does not recompile."""
    backend, device = case
    torch._dynamo.reset()
    model, loss_fn, loss_of_batch, step = compiled_step_case(backend, device)
    eager_loss, eager_grads = step(loss_of_batch)
    compiled = torch.compile(loss_of_batch, fullgraph=True)
    loss, grads = step(compiled)
    assert_close(loss, eager_loss, torch.float32)
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, torch.float32, grad=True)
    if backend == "reference":
        return  # the reference reads Python weights: a change is a new constant there
    loss_fn.set_part_weight("exp", 3.0)
    with torch.compiler.set_stance("fail_on_recompile"):
        loss2, _ = step(compiled)
    eager_loss2, _ = step(loss_of_batch)
    assert_close(loss2, eager_loss2, torch.float32)
    assert not torch.allclose(loss2, loss)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_host_sync_on_gpu(backend):
    """Forward, per-term values and backward never synchronise with the host."""
    if backends.unavailable_reason(backend, "cuda"):
        pytest.skip(backends.unavailable_reason(backend, "cuda"))
    loss_fn = fusedloss.PVALoss(use_last_frame_loss=True, backend=backend).cuda()
    pred = torch.randn(8, 80, 265, device="cuda", requires_grad=True)
    target = torch.randn(8, 80, 265, device="cuda")
    cond = torch.randn(8, 265, device="cuda")
    loss_fn(pred, target, cond)  # warm-up: compile kernels, move buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, terms = loss_fn(pred, target, cond)
        (total + sum(terms.values())).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
