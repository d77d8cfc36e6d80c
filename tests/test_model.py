"""The kernels' memory traffic and sm_90 machine code against their budgets, and the Triton
out-of-bounds check (marker ``model``; fusedloss/benchmark/model.py, traffic.py, sm90.py).

Guard: at small shapes that run every kernel, each launch of the fused forward and backward is
measured as the H200 model measures it (the CUDA kernels in the SIMT lane's trace build, the
Triton kernels in the interpreter with a GPU launch's tiles) and compared with
tests/model_budgets.json: the modelled DRAM bytes (distinct sectors), the bytes requested (sectors
of every request: what L1/L2 serve), the sectors requested over the ideal, and the spill bytes of
its sm_90 code. Each may exceed its budget by at most ``MARGIN`` (bytes, sectors)
and not at all (spills). The budgets are today's figures:

    FUSEDLOSS_UPDATE_MODEL_BUDGETS=1 python -m pytest tests/test_model.py -m model   # rewrite them

Out of bounds: every Triton kernel, at edge shapes and layouts, with the tiles of a GPU launch and
with the interpreter's, has every active lane of every access checked against the tensors its
launch was given (traffic.TritonTracer); a planted unmasked load past the end must be caught.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fusedloss.functional as fl
from fusedloss import backends
from fusedloss.benchmark import model, sm90
from fusedloss.benchmark.traffic import TritonTracer, as_on_gpu

pytestmark = pytest.mark.model

BUDGETS = Path(__file__).with_name("model_budgets.json")
UPDATE = os.environ.get("FUSEDLOSS_UPDATE_MODEL_BUDGETS") == "1"
MARGIN = 0.02  # relative, on DRAM bytes and on sectors requested over the ideal


# ---- the guard's cases: small, and every kernel (both score paths, 16-bit loads) ----------------

def _pva(B, L, D, dtype):
    def make(_, device="cpu"):
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(B, L, D, generator=g).to(dtype).requires_grad_()
        target = torch.randn(B, L, D, generator=g).to(dtype)
        cond = torch.randn(B, D, generator=g).to(dtype)
        dim_ws = torch.linspace(0.5, 1.5, D, dtype=torch.float64)

        def run(backend):
            return fl.pva_loss(pred, target, cond, use_last_frame_loss=True, use_reg_loss=True, dim_ws=dim_ws,
                               backend=backend)[0]

        return (pred,), run, lambda: F.mse_loss(pred, target)

    return "pva", make


def _blendshape(shape, dtype=torch.float32, **kwargs):
    def make(_, device="cpu"):
        g = torch.Generator().manual_seed(0)
        pred, target, raw, prev = (torch.rand(shape, generator=g).to(dtype) for _ in range(4))
        pred.requires_grad_()
        matrix = torch.randn(12, shape[-1], generator=g) / 8 if kwargs.get("landmark_weight") else None
        extra = dict(raw_pred=raw, prev_pred=prev, landmark_matrix=matrix) if kwargs else {}

        def run(backend):
            return fl.blendshape_loss(pred, target, **extra, **kwargs, backend=backend)

        return (pred,), run, lambda: F.mse_loss(pred, target)

    return "blendshape", make


def _score(B):
    def make(_, device="cpu"):
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(B, generator=g).requires_grad_()
        logits = torch.randn(B, 2, generator=g)
        labels = (torch.rand(B, generator=g) < 0.5).float()

        def run(backend):
            return fl.combined_loss(scores, logits, labels, check_finite=False, backend=backend)[0]

        return (scores,), run, lambda: F.mse_loss(scores, labels)

    return "score", make


GUARD = {
    "pva [2, 32, 265] float32": _pva(2, 32, 265, torch.float32),
    "pva [2, 32, 265] bfloat16": _pva(2, 32, 265, torch.bfloat16),
    "blendshape [64, 52]": _blendshape((64, 52)),
    "blendshape [2, 8, 52] all terms": _blendshape((2, 8, 52), temporal_weight=0.2, landmark_weight=0.1,
                                                  smoothing_weight=0.1, consistency_weight=0.1),
    "score B=300 all pairs": _score(300),
    "score B=5000 sorted": _score(5000),
}


@pytest.fixture(scope="module")
def cuda_lane():
    try:
        lane = model.CudaLane()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield lane
    lane.close()


@pytest.fixture(scope="module")
def cuda_facts():
    reason = sm90.unavailable_reason("cuda")
    if reason:
        pytest.skip(f"sm_90 facts of the CUDA kernels: {reason}")
    return sm90.cuda_facts()


def measure(name: str, backend: str, lane, cuda_facts) -> list[dict]:
    """(kernel, DRAM bytes, sectors requested / ideal, spill bytes) of every kernel launch."""
    family, make = GUARD[name]
    case = model.Case(family, name, 1, make, {"forward": 0, "backward": 0})
    full = model.record(make, 1, "cpu")
    launches = model.fused_launches(case, backend, full, [(1, full)], lane)
    model.attach_facts(launches, backend, cuda_facts)
    out = []
    for la in launches:
        if la.kind != "kernel":
            continue
        spills = (la.facts["spill_stores"] + la.facts["spill_loads"]) if la.facts else None
        out.append({"kernel": la.name, "phase": la.phase, "dram_bytes": la.bytes,
                    "requested_bytes": 32 * (la.traffic["load_sectors"] + la.traffic["store_sectors"]),
                    "excess": round(la.traffic["excess"], 4), "spill_bytes": spills})
    return out


def check_budget(name: str, backend: str, got: list[dict]) -> None:
    budgets = json.loads(BUDGETS.read_text()) if BUDGETS.is_file() else {}
    if UPDATE:
        budgets.setdefault(name, {})[backend] = got
        BUDGETS.write_text(json.dumps(budgets, indent=1, sort_keys=True) + "\n")
        return
    want = budgets.get(name, {}).get(backend)
    assert want is not None, f"no budget for {name} / {backend}: FUSEDLOSS_UPDATE_MODEL_BUDGETS=1 writes them"
    assert [g["kernel"] for g in got] == [w["kernel"] for w in want], \
        f"the launches changed: {[g['kernel'] for g in got]} (budgets: {[w['kernel'] for w in want]})"
    over = []
    for g, w in zip(got, want):
        where = f"{g['phase']} {g['kernel']}"
        for key, what in (("dram_bytes", "DRAM bytes"), ("requested_bytes", "bytes requested (sectors x 32)")):
            if g[key] > w[key] * (1 + MARGIN):
                over.append(f"{where}: {what} {g[key]} > budget {w[key]} (+{MARGIN:.0%})")
        if g["excess"] > w["excess"] * (1 + MARGIN):
            over.append(f"{where}: sectors per request {g['excess']:.3f}x the ideal > budget {w['excess']:.3f}x "
                        f"(+{MARGIN:.0%})")
        if g["spill_bytes"] is not None and w["spill_bytes"] is not None and g["spill_bytes"] > w["spill_bytes"]:
            over.append(f"{where}: {g['spill_bytes']} spill bytes > budget {w['spill_bytes']}")
    assert not over, f"{name} ({backend}) is over its budget:\n  " + "\n  ".join(over)


@pytest.mark.parametrize("name", GUARD)
def test_cuda_kernels_within_budget(name, cuda_lane, cuda_facts):
    check_budget(name, "cuda", measure(name, "cuda", cuda_lane, cuda_facts))


def _triton_here():
    if not backends.triton_interpreter():
        pytest.skip("the Triton kernels are measured through the interpreter (TRITON_INTERPRET=1)")
    reason = sm90.unavailable_reason("triton")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def triton_compiled():
    """Every guard case's Triton kernel variants compiled for sm_90 at once (one compiler process;
    the budget tests then read their facts from sm90's cache)."""
    _triton_here()
    specs = []
    for family, make in GUARD.values():
        specs += model.triton_specs(model.record(make, 1, "cpu"))
    sm90.triton_facts(specs)


@pytest.mark.parametrize("name", GUARD)
def test_triton_kernels_within_budget(name, triton_compiled):
    check_budget(name, "triton", measure(name, "triton", None, None))


def test_triton_blendshape_wide_rows_do_not_spill():
    """A row of K = 1000 float64 columns is one tile of 1024 values, more than the 512 a float64
    tile holds elsewhere: the launch gives it 8 warps, so the forward's 8 accumulators still fit in
    registers (on 4 warps the all-terms forward spills 56 bytes)."""
    _triton_here()
    _, make = _blendshape((2, 2, 1000), dtype=torch.float64, temporal_weight=0.2, landmark_weight=0.1,
                          smoothing_weight=0.1, consistency_weight=0.1)
    facts = sm90.triton_facts(model.triton_specs(model.record(make, 1, "cpu")))  # (GPU launches' tiles)
    assert {f.name for f in facts} == {"blendshape_forward_kernel", "blendshape_backward_kernel"}
    for f in facts:
        assert (f.threads, f.spill_stores + f.spill_loads) == (256, 0), f.name


# ---- the Triton out-of-bounds check -----------------------------------------------------------


def _pva_edge(dtype, layout):
    def run(backend):
        g = torch.Generator().manual_seed(1)
        B, L, D = 3, 17, 33
        pred = torch.randn(B, D, L, generator=g).to(dtype).transpose(1, 2) if layout == "transposed" else \
            torch.randn(B, L, D, generator=g).to(dtype)
        pred.requires_grad_()
        target = torch.randn(2 * B, L, D, generator=g).to(dtype)[::2]
        cond = torch.randn(B, D, generator=g).to(dtype).requires_grad_()
        total, _ = fl.pva_loss(pred, target, cond, part_w_dict={"a": (1, 30, 1.0), "b": (30, 0, 0.5)},
                               use_last_frame_loss=True, use_reg_loss=True, loss_type="l1", backend=backend)
        torch.autograd.grad(total * 1.5, (pred, cond))
    return run


def _blendshape_edge(shape, groups=None):
    def run(backend):
        g = torch.Generator().manual_seed(2)
        pred = torch.rand(shape, generator=g).requires_grad_()
        target = torch.rand(shape, generator=g)
        raw = torch.rand(2 * shape[0], *shape[1:], generator=g)[::2].requires_grad_() if len(shape) == 3 else None
        prev = torch.rand(shape, generator=g) if len(shape) == 3 else None
        kw = dict(temporal_weight=0.2, landmark_weight=0.1, smoothing_weight=0.1, consistency_weight=0.1,
                  landmark_matrix=torch.randn(5, shape[-1], generator=g)) if len(shape) == 3 else {}
        total = fl.blendshape_loss(pred, target, raw, prev, perceptual_groups=groups, backend=backend, **kw)
        torch.autograd.grad(total, [t for t in (pred, raw) if t is not None])
    return run


def _score_edge(B, ranking_only=False):
    def run(backend):
        g = torch.Generator().manual_seed(3)
        scores = torch.rand(B, 2, generator=g)[:, 0].requires_grad_()
        logits = torch.randn(B, 2, generator=g).requires_grad_()
        labels = (torch.rand(B, generator=g) < 0.5).double()
        weights = dict(regression_weight=0.0, classification_weight=0.0) if ranking_only else {}
        total, _ = fl.combined_loss(scores, logits, labels, regression_type="smoothl1", check_finite=False,
                                    backend=backend, **weights)
        torch.autograd.grad(total, (scores, logits), allow_unused=True)
    return run


EDGES = {
    "pva [3, 17, 33] transposed pred, strided target": _pva_edge(torch.float32, "transposed"),
    "pva [3, 17, 33] float16": _pva_edge(torch.float16, "contiguous"),
    "blendshape [5, 3, 7] all terms, strided raw": _blendshape_edge((5, 3, 7)),
    "blendshape [9, 52] groups": _blendshape_edge((9, 52), groups=[(range(0, 10), 1.0), (range(20, 30), 0.5)]),
    "score B=1": _score_edge(1),
    "score B=257 all pairs": _score_edge(257),
    "score B=4097 sorted, ranking only": _score_edge(4097, ranking_only=True),
}


@pytest.mark.parametrize("tiles", ["gpu", "interpreter"])
@pytest.mark.parametrize("name", EDGES)
def test_triton_kernels_stay_in_bounds(name, tiles):
    _triton_here()
    with (as_on_gpu() if tiles == "gpu" else _nothing()), TritonTracer(keep=False) as tracer:
        EDGES[name]("triton")
    assert tracer.launches, "no Triton kernel ran"
    assert not tracer.out_of_bounds()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_bounds_check_catches_an_unmasked_load_past_the_end():
    _triton_here()
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            x = tl.load(x_ptr + offsets, mask=offsets < n)
        else:
            x = tl.load(x_ptr + offsets)  # the planted bug: the last block reads past the end of x
        tl.store(y_ptr + offsets, x, mask=offsets < n)

    x, y = torch.randn(100), torch.empty(100)
    with TritonTracer() as tracer:
        copy_kernel[(2,)](x, y, 100, BLOCK=64, MASKED=True)
    assert not tracer.out_of_bounds() and torch.equal(x, y)
    # (OutOfBoundsError, raised before the access runs; the interpreter re-raises it as its own error)
    with pytest.raises(Exception, match=r"OutOfBoundsError.*copy_kernel program \(1, 0, 0\) access #0 \(load\): "
                                        r"28 active lane\(s\) outside every argument buffer, first at .* "
                                        r"\(0 bytes past the end of x_ptr\)"):
        with TritonTracer():
            copy_kernel[(2,)](x, y, 100, BLOCK=64, MASKED=False)


def test_calibration_pairs_ncu_rows_with_the_models_launches_by_name():
    from fusedloss.benchmark.calibrate import match_launches

    def launch(name):
        return ("case", "fused cuda", {"name": name})

    expected = [launch("score_keys_kernel<float, float>"), launch("score_forward_kernel<float, float, true>"),
                launch("score_backward_kernel<float, float>"), launch("pva_forward_kernel<float>")]
    measured = [{"kernel": "void score_keys_kernel<float, float>(...)"}, {"kernel": "score_other_kernel"},
                {"kernel": "void score_forward_kernel<float, float, true>(...)"},
                {"kernel": "void pva_forward_kernel<float>(...)"}]
    got = [(e[2]["name"].split("<")[0], m and m["kernel"]) for e, m in match_launches(expected, measured)]
    assert got == [("score_keys_kernel", measured[0]["kernel"]), ("score_forward_kernel", measured[2]["kernel"]),
                   ("score_backward_kernel", None), ("pva_forward_kernel", measured[3]["kernel"])]
