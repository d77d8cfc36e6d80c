"""What each rank of tests/test_distributed.py runs (in its own process, over gloo).

Every rank builds the same global batch from a seed, takes its own rows (uneven slices, empty
ones included) and checks, against the reference of the whole batch computed in this process:
the loss and every term on every rank, and its input gradients, which must be W times the
whole-batch gradient of its rows (what DDP's averaging turns into the single-process gradient).
"""

from __future__ import annotations

import copy
import os
import sys

if "TRITON_INTERPRET" not in os.environ:  # (before triton is imported; conftest does the same)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fusedloss  # noqa: E402
from fusedloss import backends  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_close  # noqa: E402

DEVICE = torch.device("cpu")  # the ranks' device: set by ``worker``


def fused_backends() -> list[str]:
    candidates = ("cuda", "triton") if DEVICE.type == "cuda" else ("cpu", "triton")
    return [b for b in candidates if backends.unavailable_reason(b, DEVICE.type) is None]


def slices(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def check_call(call, make_inputs, sizes: list[int], dtype, grad_weights, msg: str, reference_call=None):
    """``call(*local_inputs, group)`` on this rank's rows against ``call(*whole_inputs, None)``
    (or ``reference_call``) on the whole batch: values, and gradients of
    sum(grad_weights[k] * output_k) (k: "total" and the terms)."""
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = slices(sizes, rank)
    whole = make_inputs()
    local = [None if x is None else x.detach().to(DEVICE)[rows].clone().requires_grad_(x.requires_grad)
             for x in whole]
    whole = [None if x is None else x.detach().to(DEVICE).clone().requires_grad_(x.requires_grad) for x in whole]
    got = call(*local, group)
    expected = (reference_call or call)(*whole, None)
    assert list(got) == list(expected), f"{msg}: terms {list(got)} != {list(expected)}"
    for name in expected:
        assert_close(got[name], expected[name], dtype, msg=f"{msg} rank {rank}/{world} term {name}")
    weights = [grad_weights.get(name, 0.0) for name in expected]
    objective = sum(w * got[name] for w, name in zip(weights, expected) if w)
    objective_expected = sum(w * expected[name] for w, name in zip(weights, expected) if w)
    wrt_local = [x for x in local if x is not None and x.requires_grad]
    wrt_whole = [x for x in whole if x is not None and x.requires_grad]
    grads = torch.autograd.grad(objective, wrt_local, allow_unused=True, materialize_grads=True)
    grads_expected = torch.autograd.grad(objective_expected, wrt_whole, allow_unused=True, materialize_grads=True)
    for i, (g, e) in enumerate(zip(grads, grads_expected)):
        assert_close(g, world * e[rows], dtype, grad=True, msg=f"{msg} rank {rank}/{world} gradient {i}")


def random(g, *shape, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# One function per family: every backend, a few configurations and dtypes
# ---------------------------------------------------------------------------------------------


def check_pva(sizes: list[int]) -> None:
    B = sum(sizes)
    parts = {"a": (0, 3, 1.0), "b": (2, 7, 0.5), "c": (0, 0, 2.0)}
    for backend in ["reference"] + fused_backends():
        for dtype, loss_type, last, reg in [(torch.float32, "l2", True, True), (torch.float64, "l1", False, True),
                                            (torch.bfloat16, "l2", True, False)]:
            g = torch.Generator().manual_seed(1)
            L, D = (3, 7)

            def make_inputs():
                return [random(g, B, L, D, dtype=dtype).requires_grad_(), random(g, B, L, D, dtype=dtype).requires_grad_(),
                        random(g, B, D, dtype=dtype).requires_grad_()]

            def call(pred, target, cond, group):
                loss_fn = fusedloss.PVALoss(parts, use_last_frame_loss=last, use_reg_loss=reg, loss_type=loss_type,
                                            backend=backend)
                loss_fn(pred, target, cond)  # a plan for the slice alone, dropped by the assignment
                loss_fn.process_group = group
                loss_fn = copy.deepcopy(loss_fn)
                assert loss_fn.process_group is group  # a copy shares the group
                total, terms = loss_fn(pred, target, cond)
                return {**terms, "total": total}

            g.manual_seed(1)
            check_call(call, make_inputs, sizes, dtype, {"total": 0.7, "a_V": 1.3},
                       f"pva {backend} {dtype} {loss_type}")
            # The functional form, non-contiguous inputs (a transposed view).
            g.manual_seed(2)

            def make_strided():
                return [random(g, B, D, L, dtype=dtype).transpose(1, 2).requires_grad_(),
                        random(g, B, L, D, dtype=dtype).requires_grad_(), None]

            def functional(pred, target, cond, group):
                total, terms = fusedloss.functional.pva_loss(pred, target, None, parts, loss_type=loss_type,
                                                             backend=backend, process_group=group)
                return {**terms, "total": total}

            check_call(functional, make_strided, sizes, dtype, {"total": -1.5}, f"pva functional {backend} {dtype}")


def check_blendshape(sizes: list[int]) -> None:
    B = sum(sizes)
    K, T, J = 6, 3, 4
    matrix = torch.randn(J, K, generator=torch.Generator().manual_seed(3))
    configs = [
        ("default", dict(), 2),
        ("all terms", dict(temporal_weight=0.3, landmark_weight=0.2, smoothing_weight=0.4, consistency_weight=0.5,
                           landmark_matrix=matrix), 3),
        ("groups", dict(perceptual_groups=[([0, 1, 1], 1.0), ([2, 5], 0.5)], temporal_weight=0.1), 3),
        ("2-D", dict(threshold=0.2), 2),
    ]
    for backend in ["reference"] + fused_backends():
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for label, options, dims in configs:
                g = torch.Generator().manual_seed(4)
                shape = (B, T, K) if dims == 3 else (B, K)

                def make_inputs():
                    return [random(g, *shape, dtype=dtype).sigmoid().requires_grad_(),
                            random(g, *shape, dtype=dtype).sigmoid().requires_grad_(),
                            random(g, *shape, dtype=dtype).requires_grad_(), random(g, *shape, dtype=dtype)]

                def call(pred, target, raw, prev, group):
                    loss_fn = fusedloss.BlendshapeLoss(**options, backend=backend, process_group=group)
                    total, terms = loss_fn(pred, target, raw, prev, return_components=True)
                    return dict(terms)

                def reference(pred, target, raw, prev, group):
                    loss_fn = fusedloss.BlendshapeLoss(**options, backend="reference")
                    return dict(loss_fn(pred, target, raw, prev, return_components=True)[1])

                check_call(call, make_inputs, sizes, dtype, {"total": 0.7, "perceptual": 1.9, "mse": -0.4},
                           f"blendshape {backend} {dtype} {label}", reference_call=reference)
        # The functional form.
        g = torch.Generator().manual_seed(5)

        def make_pair():
            return [torch.rand(B, T, K, generator=g).requires_grad_(), torch.rand(B, T, K, generator=g).requires_grad_()]

        def functional(pred, target, group):
            return dict(fusedloss.functional.blendshape_loss(pred, target, backend=backend, return_components=True,
                                                             process_group=group)[1])

        check_call(functional, make_pair, sizes, torch.float32, {"total": 1.0}, f"blendshape functional {backend}")


def check_score(sizes: list[int], classes: list[str]) -> None:
    """``classes[r]``: "real", "fake" or "mixed" labels on rank r's rows."""
    B = sum(sizes)
    for backend in ["reference"] + fused_backends():
        for dtype, regression_type in [(torch.float32, "mse"), (torch.float64, "smoothl1"), (torch.bfloat16, "mse")]:
            g = torch.Generator().manual_seed(6)

            def make_inputs():
                labels = torch.cat([
                    torch.ones(n) if kind == "real" else torch.zeros(n) if kind == "fake" else
                    (torch.rand(n, generator=g) > 0.5).double()
                    for n, kind in zip(sizes, classes)])
                return [random(g, B, 1, dtype=dtype).requires_grad_(), random(g, B, 2, dtype=dtype).requires_grad_(),
                        labels.view(B, 1)]

            def call(scores, logits, labels, group):
                loss_fn = fusedloss.CombinedLoss(regression_type=regression_type, margin=0.7, backend=backend,
                                                 process_group=group)
                return dict(loss_fn(scores, logits, labels)[1])

            check_call(call, make_inputs, sizes, dtype, {"total": 0.7, "ranking": 1.3},
                       f"combined {backend} {dtype}")

            def ranking(scores, logits, labels, group):
                loss_fn = fusedloss.AllPairsMarginRankingLoss(margin=1.5, reduction="sum", backend=backend,
                                                              process_group=group)
                return {"ranking": loss_fn(scores.view(-1), labels)}

            check_call(ranking, make_inputs, sizes, dtype, {"ranking": -2.0}, f"ranking {backend} {dtype}")

            def functional(scores, logits, labels, group):
                return {"ranking": fusedloss.functional.all_pairs_margin_ranking_loss(
                    scores, labels, backend=backend, process_group=group)}

            check_call(functional, make_inputs, sizes, dtype, {"ranking": 1.0}, f"ranking functional {backend}")


def check_host_group_twin(sizes: list[int]) -> None:
    """A group without a CPU backend (NCCL's case) exchanges the gather's row counts over a gloo
    twin made on first use: here gloo's group posing as one without."""
    from fusedloss.core import distributed

    group = dist.group.WORLD
    real_get_backend = dist.get_backend
    dist.get_backend = lambda g=None: "nccl" if g is group else real_get_backend(g)
    try:
        assert distributed.batch_sizes(sizes[dist.get_rank()], group) == sizes
        twin = distributed._HOST_GROUPS[group]
        assert twin is not group and distributed.batch_sizes(1, group) == [1] * len(sizes)
        assert distributed._HOST_GROUPS[group] is twin  # made once
    finally:
        dist.get_backend = real_get_backend


def check_compiled(sizes: list[int]) -> None:
    """torch.compile traces the losses over a group (the collectives included; the score loss's
    row counts are a graph break): the same values and gradients as eager."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    for backend in fused_backends()[:1]:
        g = torch.Generator().manual_seed(8)
        B = sum(sizes)
        cases = [
            ("pva", fusedloss.PVALoss({"a": (0, 0, 1.0)}, backend=backend, process_group=group),
             [torch.randn(B, 4, 5, generator=g), torch.randn(B, 4, 5, generator=g)], True),
            ("blendshape", fusedloss.BlendshapeLoss(backend=backend, process_group=group),
             [torch.rand(B, 6, generator=g), torch.rand(B, 6, generator=g)], True),
            ("score", fusedloss.CombinedLoss(backend=backend, check_finite=False, process_group=group),
             [torch.randn(B, generator=g), torch.randn(B, 2, generator=g), (torch.rand(B, generator=g) > 0.5).float()],
             False),
        ]
        for family, loss_fn, inputs, fullgraph in cases:
            local = [x[slices(sizes, rank)].to(DEVICE) for x in inputs]

            def step(first, *rest):
                out = loss_fn(first, *rest)
                return out[0] if isinstance(out, tuple) else out

            torch._dynamo.reset()
            compiled = torch.compile(step, backend="aot_eager", fullgraph=fullgraph)
            results = []
            for fn in (step, compiled):
                first = local[0].clone().requires_grad_()
                value = fn(first, *local[1:])
                value.backward()
                results.append((value.detach(), first.grad))
            (value, grad), (value_c, grad_c) = results
            assert_close(value_c, value, torch.float32, msg=f"compiled {family} {backend} rank {rank}/{world}")
            assert_close(grad_c, grad, torch.float32, grad=True, msg=f"compiled {family} {backend} gradient")


def check_ddp_gradients(sizes: list[int]) -> None:
    """A small model under DistributedDataParallel: its averaged parameter gradients equal the
    single-process gradient of the whole-batch loss, for every family."""
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    rows = slices(sizes, rank)
    B = sum(sizes)
    for backend in ["reference"] + fused_backends():
        for family in ("pva", "blendshape", "score"):
            torch.manual_seed(0)
            width = {"pva": 7 * 3, "blendshape": 6, "score": 3}[family]
            model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, width))
            single = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, width))
            single.load_state_dict(model.state_dict())
            ddp = DistributedDataParallel(model)
            g = torch.Generator().manual_seed(7)
            x = torch.randn(B, 5, generator=g)
            target = torch.rand(B, width, generator=g)
            labels = (torch.rand(B, generator=g) > 0.4).float()

            def loss(net, rows, group):
                out = net(x[rows])
                if family == "pva":
                    return fusedloss.PVALoss({"p": (0, 0, 1.0)}, backend=backend, process_group=group)(
                        out.view(-1, 3, 7), target[rows].view(-1, 3, 7))[0]
                if family == "blendshape":
                    return fusedloss.BlendshapeLoss(backend=backend, process_group=group)(out.sigmoid(), target[rows])
                return fusedloss.CombinedLoss(backend=backend, process_group=group)(out[:, 0], out[:, 1:],
                                                                                     labels[rows])[0]

            local = loss(ddp, rows, dist.group.WORLD)
            local.backward()
            whole = loss(single, slice(0, B), None)
            whole.backward()
            assert_close(local, whole, torch.float32, msg=f"ddp {family} {backend} loss")
            for (name, p), q in zip(model.named_parameters(), single.parameters()):
                assert_close(p.grad, q.grad, torch.float32, grad=True, msg=f"ddp {family} {backend} {name}")


CHECKS = {"pva": check_pva, "blendshape": check_blendshape, "score": check_score, "ddp": check_ddp_gradients,
          "host group": check_host_group_twin, "compile": check_compiled}


def worker(rank: int, world: int, init_file: str, check: str, args: tuple, device: str = "cpu") -> None:
    """Rank ``rank`` of ``world``: gloo on the CPU, NCCL on CUDA (one GPU per rank)."""
    global DEVICE
    torch.set_num_threads(1)
    DEVICE = torch.device(device if device == "cpu" else f"cuda:{rank}")
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        CHECKS[check](*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
