"""How the fused losses behave inside autograd and inside a training step, for every family:

- every tensor a fused backend keeps for backward goes through ``save_for_backward``, so
  saved-tensor hooks (activation offloading, non-reentrant checkpointing) can free a non-leaf
  input after the forward, as they can with the reference;
- double backward through a fused backend raises a clear error instead of a silent zero;
- the eager call plans cached by the modules follow setting changes, new shapes and ``.half()``;
- a whole training step (model, fused loss, backward, optimizer) runs on fake tensors, so it
  has no host sync and no allocation whose size depends on data (what CUDA graphs need);
- on a GPU: that step captured in a CUDA graph replays with the eager results, and
  ``torch.compile(mode="reduce-overhead")`` of it matches eager too.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import FUSED, HAS_CUDA, assert_close
from torch import nn

from fusedloss import AllPairsMarginRankingLoss, BlendshapeLoss, CombinedLoss, PVALoss

FAMILIES = ("pva", "blendshape", "score", "ranking")


def make_loss(family: str, backend: str, **kwargs):
    """A loss module, and f(loss_fn, pred) -> scalar calling it on inputs derived from pred."""
    if family == "pva":
        parts = {"scale": (0, 1, 1.0), "yaw": (1, 7, 0.5), "exp": (5, 11, 2.0)}  # overlapping, D = 11
        return PVALoss(parts, use_last_frame_loss=True, use_reg_loss=True, backend=backend, **kwargs)
    if family == "blendshape":
        return BlendshapeLoss(temporal_weight=0.3, smoothing_weight=0.2, backend=backend, **kwargs)
    if family == "score":
        return CombinedLoss(check_finite=False, backend=backend, **kwargs)
    return AllPairsMarginRankingLoss(backend=backend, **kwargs)


def pred_shape(family: str) -> tuple[int, ...]:
    return {"pva": (3, 7, 11), "blendshape": (3, 5, 13), "score": (9, 3), "ranking": (9, 1)}[family]


def constants(family: str, device: str, g: torch.Generator, dtype=torch.float64):
    """The inputs that are not predictions (targets, labels), fixed per test."""
    shape = pred_shape(family)
    if family == "pva":
        return (torch.randn(shape, generator=g, dtype=dtype).to(device),
                torch.randn(shape[0], shape[2], generator=g, dtype=dtype).to(device))
    if family == "blendshape":
        return (torch.rand(shape, generator=g, dtype=dtype).to(device),)
    labels = (torch.arange(shape[0]) % 3 == 0).float()[:, None].to(device)
    return (labels,)


def call(family: str, loss_fn, pred: torch.Tensor, consts) -> torch.Tensor:
    """The loss of ``pred`` (every differentiable input is a function of it)."""
    if family == "pva":
        target, cond = consts
        return loss_fn(pred, target, pred[:, 0] * 0.5 + cond)[0]
    if family == "blendshape":
        (target,) = consts
        return loss_fn(pred, target, raw_pred=pred.flip(1) * 0.9)
    (labels,) = consts
    if family == "score":
        return loss_fn(pred[:, :1], pred[:, 1:], labels)[0]
    return loss_fn(pred, labels)


BACKENDS = [pytest.param(("reference", "cpu"), id="reference-cpu")] + FUSED


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", BACKENDS)
def test_saved_tensor_hooks_free_a_non_leaf_input(family, case):
    backend, device = case
    g = torch.Generator().manual_seed(1)
    consts = constants(family, device, g)
    leaf = torch.randn(pred_shape(family), generator=g, dtype=torch.float64).to(device).requires_grad_()
    loss_fn = make_loss(family, backend).to(device)

    packed = []

    def pack(tensor):  # "offload": keep a copy, let the original go
        packed.append(tensor.shape)
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda copy: copy):
        pred = leaf * 1.5 + 0.25  # a non-leaf input, as a model's output is
        alive = weakref.ref(pred)
        loss = call(family, loss_fn, pred, consts)
    del pred
    gc.collect()
    assert packed, "nothing went through the saved-tensor hooks"
    assert alive() is None, f"{backend}: the non-leaf input outlives the forward (kept outside save_for_backward)"
    loss.backward()

    expected_leaf = leaf.detach().clone().requires_grad_()
    call(family, make_loss(family, "reference").to(device), expected_leaf * 1.5 + 0.25, consts).backward()
    assert_close(leaf.grad, expected_leaf.grad, torch.float64, grad=True, msg=f"{family} {backend} grad")


@pytest.mark.parametrize("family", FAMILIES)
def test_double_backward_raises(family):
    backend, device = "cpu", "cpu"
    g = torch.Generator().manual_seed(2)
    consts = constants(family, device, g)
    leaf = torch.randn(pred_shape(family), generator=g, dtype=torch.float64).requires_grad_()
    loss = call(family, make_loss(family, backend), leaf * 1.0, consts)
    # First-order gradients with create_graph=True are the ordinary ones ...
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    expected_leaf = leaf.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(call(family, make_loss(family, "reference"), expected_leaf * 1.0, consts),
                                      expected_leaf)
    assert_close(grad, expected, torch.float64, grad=True, msg=family)
    # ... and differentiating them says why it cannot, rather than returning zeros.
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_plans_follow_settings_shapes_and_dtype_changes(family):
    """A module's cached plan is its eager fast path: it must not outlive what it was made for."""
    g = torch.Generator().manual_seed(3)
    consts = constants(family, "cpu", g)
    loss_fn = make_loss(family, "cpu")
    reference = make_loss(family, "reference")
    pred = torch.randn(pred_shape(family), generator=g, dtype=torch.float64)

    def agree(msg):
        torch.testing.assert_close(call(family, loss_fn, pred, consts), call(family, reference, pred, consts),
                                   msg=lambda m: f"{msg}: {m}")

    agree("first call")
    agree("cached call")
    assert loss_fn._plans, "the module cached no plan"
    # A setting changes: both modules get it.
    for module in (loss_fn, reference):
        if family == "pva":
            module.set_part_weight("yaw", 3.0, reg_weight=0.5)
        elif family == "blendshape":
            module.l1_weight = 0.0  # a term dropped: the term set changes
            module.threshold = 0.3
        elif family == "score":
            module.ranking_weight = 2.0
            module.margin = 0.1
        else:
            module.margin = 0.9
    agree("after a setting change")
    # Another batch size.
    pred = torch.randn((5,) + pred_shape(family)[1:], generator=g, dtype=torch.float64)
    consts = tuple(torch.cat([c, c[:2]])[:5] for c in consts)
    agree("another shape")
    # .half() of a model holding the loss leaves the float64 tables alone.
    loss_fn.half()
    for name in loss_fn._TABLES:
        table = loss_fn._buffers[name]
        assert table is None or table.dtype == torch.float64, f"{name} became {table.dtype}"
    agree("after .half()")


# ---------------------------------------------------------------------------------------------
# A training step: model forward, fused loss, backward, optimizer step
# ---------------------------------------------------------------------------------------------


class Head(nn.Module):
    """A small model whose output has the family's prediction shape."""

    def __init__(self, family: str, device: str) -> None:
        super().__init__()
        self.shape = pred_shape(family)
        n = 1
        for s in self.shape:
            n *= s
        self.linear = nn.Linear(4, n, dtype=torch.float32, device=device)

    def forward(self, x):
        return self.linear(x).view(self.shape)


def step_inputs(family: str, device: str):
    g = torch.Generator().manual_seed(4)
    consts = constants(family, device, g, torch.float32)
    return torch.randn(4, generator=g).to(device), consts


def make_step(family: str, backend: str, device: str):
    torch.manual_seed(0)
    model = Head(family, device)
    loss_fn = make_loss(family, backend)
    if device != "cpu":  # (.to() cannot swap fake parameters)
        loss_fn.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, consts):
        optimizer.zero_grad(set_to_none=False)
        loss = call(family, loss_fn, model(x), consts)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_training_step_runs_on_fake_tensors(family, backend):
    """Fake tensors have no data: a host sync (.item(), a data-dependent shape) raises on them.
    The C++ kernels and Triton launchers are replaced by their fake implementations here, so this
    checks the Python path and the operators' shapes; the CUDA graph test below checks the rest."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedloss import backends

    if backends.unavailable_reason(backend, "cpu"):
        pytest.skip(backends.unavailable_reason(backend, "cpu"))
    with FakeTensorMode():
        _, step = make_step(family, backend, "cpu")
        x, consts = step_inputs(family, "cpu")
        for _ in range(2):  # the second call takes the module's cached plan
            loss = step(x, consts)
    assert loss.shape == ()


def cuda_cases():
    cases = []
    for backend in ("cuda", "triton"):
        for family in FAMILIES:
            cases.append(pytest.param(backend, family, id=f"{backend}-{family}",
                                      marks=[pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")]))
    return cases


@pytest.mark.parametrize("backend,family", cuda_cases())
def test_cuda_graph_of_a_training_step(backend, family):
    model, step = make_step(family, backend, "cuda")
    reference_model, reference_step = make_step(family, backend, "cuda")
    x, consts = step_inputs(family, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (plans, Triton compilation, optimizer state)
        for _ in range(3):
            step(x, consts)
            reference_step(x, consts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step(x, consts)
    for i in range(3):
        graph.replay()
        expected = reference_step(x, consts)
        torch.cuda.synchronize()
        torch.testing.assert_close(captured_loss, expected, msg=lambda m, i=i: f"replay {i}: {m}")
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend,family", cuda_cases())
def test_reduce_overhead_compile_of_a_training_step(backend, family):
    torch._dynamo.reset()
    model, step = make_step(family, backend, "cuda")
    reference_model, reference_step = make_step(family, backend, "cuda")
    compiled = torch.compile(step, mode="reduce-overhead")
    x, consts = step_inputs(family, "cuda")
    for i in range(4):
        loss = compiled(x, consts).clone()
        expected = reference_step(x, consts)
        torch.testing.assert_close(loss, expected, msg=lambda m, i=i: f"step {i}: {m}")
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_warnings_eager_or_compiled(family):
    """Our code triggers no warning, eagerly or while torch.compile traces it (Dynamo warns about
    traced lru_cache wrappers, autograd about missing kernels, ...)."""
    import warnings

    from torch._dynamo.utils import warn_once

    torch._dynamo.reset()
    getattr(warn_once, "cache_clear", lambda: None)()  # (it warns once per process)
    g = torch.Generator().manual_seed(5)
    consts = constants(family, "cpu", g)
    loss_fn = make_loss(family, "cpu")
    leaf = torch.randn(pred_shape(family), generator=g, dtype=torch.float64).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(family, loss_fn, leaf * 1.0, consts).backward()
        compiled = torch.compile(lambda x: call(family, loss_fn, x * 1.0, consts), fullgraph=True)
        compiled(leaf).backward()
    # Ours: raised in fusedloss, or about it (Dynamo's and autograd's warnings name our code).
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if "fusedloss" in w.filename or "fusedloss" in str(w.message)]
    assert not ours, ours


@pytest.mark.parametrize("family", ["blendshape", "score", "ranking"])
@pytest.mark.parametrize("case", BACKENDS)
def test_constants_with_a_freed_history(family, case):
    """prev_pred (blendshape) and labels (score) are constants of the loss: a tensor with an
    autograd history that was already backpropagated (last step's prediction) gets no gradient
    and its history is never walked again."""
    backend, device = case
    g = torch.Generator().manual_seed(6)
    source = torch.rand(pred_shape(family), generator=g, dtype=torch.float64).to(device).requires_grad_()
    history = source * 1.0
    history.sum().backward()  # frees history's graph
    leaf = torch.randn(pred_shape(family), generator=g, dtype=torch.float64).to(device).requires_grad_()
    if family == "blendshape":
        loss_fn = BlendshapeLoss(consistency_weight=0.5, backend=backend)
        loss = loss_fn(leaf, torch.rand_like(leaf), prev_pred=history)
    else:
        labels = (history[:, :1] > 0.5).to(history.dtype) + history[:, :1] * 0  # labels with a history
        loss_fn = make_loss(family, backend).to(device)
        loss = call(family, loss_fn, leaf, (labels,))
    loss.backward()  # would raise if it walked into the freed graph
    assert leaf.grad is not None and torch.equal(source.grad, torch.ones_like(source))


def test_triton_eager_double_backward_raises():
    from fusedloss import backends

    reason = backends.unavailable_reason("triton", "cpu")
    if reason:
        pytest.skip(reason)
    leaf = torch.randn(pred_shape("blendshape"), dtype=torch.float64).requires_grad_()
    loss = call("blendshape", make_loss("blendshape", "triton"), leaf * 1.0, constants("blendshape", "cpu",
                                                                                       torch.Generator()))
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (grad.sum() + leaf.sum()).backward()  # (with another term: no silent zero either)


def test_module_copies_and_backend_changes_do_not_share_plans():
    import copy
    import pickle

    g = torch.Generator().manual_seed(7)
    pred, target = torch.rand(4, 6, 9, generator=g, dtype=torch.float64), torch.rand(4, 6, 9, generator=g,
                                                                                      dtype=torch.float64)
    loss_fn = BlendshapeLoss(temporal_weight=0.2, backend="cpu")
    before = loss_fn(pred, target)
    twin = copy.deepcopy(loss_fn)
    pickle.loads(pickle.dumps(loss_fn))  # (plans are closures: not pickled)
    loss_fn.temporal_weight = 3.0
    torch.testing.assert_close(twin(pred, target), before, msg="a deep copy follows its original's settings")
    loss_fn.backend = "reference"
    torch.testing.assert_close(loss_fn(pred, target), BlendshapeLoss(temporal_weight=3.0, backend="reference")(
        pred, target))


def test_terms_read_first_under_no_grad_stay_differentiable():
    import torch.utils._pytree as pytree

    leaf = torch.randn(3, 7, 11, dtype=torch.float64).requires_grad_()
    g = torch.Generator().manual_seed(8)
    _, terms = make_loss("pva", "cpu")(leaf, *constants("pva", "cpu", g))
    assert type(terms) is not dict  # (the lazy mapping)
    with torch.no_grad():
        logged = {k: float(v) for k, v in terms.items()}  # e.g. logging first
    sum(terms.values()).backward()
    assert leaf.grad is not None and len(logged) == len(terms)
    rebuilt = type(terms)((k, v * 2) for k, v in terms.items())  # as DataParallel's gather does
    assert list(rebuilt) == list(terms)
    leaves, spec = pytree.tree_flatten(terms)
    assert len(leaves) == len(terms) and list(pytree.tree_unflatten(leaves, spec)) == list(terms)
