"""The seed systems' own shapes, where a training step pays a loss's host-side cost, not its kernels.

Cases: KoeMorph ``[16, 52]`` (seed 000's weights) and its sequential trainer's ``[4, 52]`` (seed
001's groups), TIGAS batches of 64 scores (``check_finite=False``), Ditto ``[8, 80, 265]`` and
``[64, 80, 265]`` with the last-frame term. For each, one forward+backward (the loss, then
``torch.autograd.grad`` of it with respect to the predictions) of:

  fused      the loss module on each available fused backend, eager, as a training loop calls it
  mse_loss   one ``F.mse_loss(pred, target)`` on the same inputs: the yardstick (1.0)
  reference  the same module with ``backend="reference"``, eager and under
             ``torch.compile(fullgraph=True)``

The variants of a case are timed in interleaved rounds and each keeps the minimum of its round
medians, so that a noisy machine slows them alike. On a GPU the table also counts the device
activities (kernels, memsets, copies) of one fused forward and of one fused backward with the
profiler.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import BlendshapeLoss, CombinedLoss, PVALoss, backends
from ..blendshape.config import DUAL_STREAM_GROUPS
from . import device_name, file_stem


@dataclass
class SeedCase:
    """``make(device) -> (predictions, constants)``; ``loss(module, *predictions, *constants)``."""

    name: str
    make: Callable
    module: Callable  # backend -> loss module
    loss: Callable


@dataclass
class SeedRow:
    case: str
    variant: str  # "fused <backend>" | "mse_loss" | "reference eager" | "reference compile"
    median_us: float
    vs_mse_loss: float
    launches_forward: int | None = None
    launches_backward: int | None = None


def _blendshape(shape, kwargs) -> SeedCase:
    def make(device):
        g = torch.Generator().manual_seed(0)
        return (torch.rand(shape, generator=g).to(device),), (torch.rand(shape, generator=g).to(device),)

    return SeedCase(f"blendshape {list(shape)}", make, lambda backend: BlendshapeLoss(**kwargs, backend=backend),
                    lambda module, pred, target: module(pred, target))


def _score(B: int) -> SeedCase:
    def make(device):
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(B, 1, generator=g).to(device)
        logits = torch.randn(B, 2, generator=g).to(device)
        labels = (torch.rand(B, 1, generator=g) < 0.5).float().to(device)
        return (scores, logits), (labels,)

    return SeedCase(f"score B={B}", make, lambda backend: CombinedLoss(check_finite=False, backend=backend),
                    lambda module, scores, logits, labels: module(scores, logits, labels)[0])


def _pva(B: int) -> SeedCase:
    def make(device):
        g = torch.Generator().manual_seed(0)
        pred = torch.randn(B, 80, 265, generator=g).to(device)
        target = torch.randn(B, 80, 265, generator=g).to(device)
        cond = torch.randn(B, 265, generator=g).to(device)
        return (pred,), (target, cond)

    return SeedCase(f"pva [{B}, 80, 265] last-frame", make,
                    lambda backend: PVALoss(use_last_frame_loss=True, backend=backend),
                    lambda module, pred, target, cond: module(pred, target, cond)[0])


CASES = (
    _blendshape((16, 52), {}),
    _blendshape((4, 52), {"perceptual_groups": DUAL_STREAM_GROUPS}),
    _score(64),
    _pva(8),
    _pva(64),
)


def _step(loss: Callable, predictions: tuple[torch.Tensor, ...], constants: tuple[torch.Tensor, ...]):
    leaves = tuple(p.detach().requires_grad_() for p in predictions)

    def step():
        return torch.autograd.grad(loss(*leaves, *constants), leaves)

    return step


def _variants(case: SeedCase, device: torch.device) -> dict[str, Callable]:
    predictions, constants = case.make(device)
    out = {}
    for backend in ("cuda", "triton", "cpu"):
        if backends.unavailable_reason(backend, device.type) is None and not (backend == "triton"
                                                                             and device.type == "cpu"):
            module = case.module(backend).to(device)
            out[f"fused {backend}"] = _step(lambda *xs, m=module: case.loss(m, *xs), predictions, constants)
    target = constants[0]  # the target, or TIGAS's labels
    out["mse_loss"] = _step(lambda pred, *rest: F.mse_loss(pred, target), predictions[:1], ())
    reference = case.module("reference").to(device)
    out["reference eager"] = _step(lambda *xs: case.loss(reference, *xs), predictions, constants)
    torch._dynamo.reset()  # (one lambda for every case: a fresh cache, not recompilations of it)
    compiled = torch.compile(lambda *xs: case.loss(reference, *xs), fullgraph=True, dynamic=False)
    out["reference compile"] = _step(compiled, predictions, constants)
    return out


def _median_us(fn: Callable, device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(20, int(min_run_time * 1e3)), return_mode="median") * 1e3
    from torch.utils.benchmark import Timer

    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def launches(case: SeedCase, backend: str, device: torch.device) -> tuple[int, int]:
    """Device activities (kernels, memsets, copies) of one fused forward and one fused backward."""
    from torch.profiler import ProfilerActivity, profile

    predictions, constants = case.make(device)
    module = case.module(backend).to(device)
    leaves = tuple(p.detach().requires_grad_() for p in predictions)
    for _ in range(3):  # warm-up: plans, Triton compilation, allocator
        torch.autograd.grad(case.loss(module, *leaves, *constants), leaves)
    torch.cuda.synchronize(device)
    counts = []
    for phase in ("forward", "backward"):
        loss = case.loss(module, *leaves, *constants) if phase == "backward" else None
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            if phase == "forward":
                loss = case.loss(module, *leaves, *constants)
            else:
                torch.autograd.grad(loss, leaves)
            torch.cuda.synchronize(device)
        counts.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    return counts[0], counts[1]


def best_of_rounds(variants: dict[str, Callable], device: torch.device, rounds: int,
                   min_run_time: float) -> dict[str, float]:
    """Each variant's median microseconds, best of ``rounds`` interleaved rounds (so that a noisy
    machine slows them alike), after two warm-up calls (compilation, plans, caches)."""
    for fn in variants.values():
        fn()
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], _median_us(fn, device, min_run_time))
    return best


def run(device: torch.device, *, rounds: int = 5, min_run_time: float = 0.1, cases=CASES,
        log: Callable[[str], None] = print) -> list[SeedRow]:
    rows: list[SeedRow] = []
    for case in cases:
        best = best_of_rounds(_variants(case, device), device, rounds, min_run_time)
        for name, us in best.items():
            row = SeedRow(case.name, name, us, us / best["mse_loss"])
            if device.type == "cuda" and name.startswith("fused"):
                row.launches_forward, row.launches_backward = launches(case, name.split()[1], device)
            rows.append(row)
            log(f"  {case.name:>28s} {name:18s} {us:9.1f} us  x{row.vs_mse_loss:.2f} mse_loss")
    return rows


def markdown(rows: list[SeedRow], device: torch.device, command: str) -> str:
    lines = [
        f"# fusedloss at the seed systems' shapes: {device_name(device)}",
        "",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), float32, {torch.get_num_threads()} CPU threads",
        ("- forward+backward of one call (torch.autograd.grad w.r.t. the predictions), minimum over interleaved "
         "rounds of the median; x mse_loss = time / one F.mse_loss(pred, target) forward+backward on the same inputs"),
        "- launches: device activities (kernels, memsets, copies) of one fused forward / backward (GPU only)",
        f"- command: `{command}`",
        "",
        "| case | variant | median us | x mse_loss | launches fwd | launches bwd |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        fwd = "-" if r.launches_forward is None else str(r.launches_forward)
        bwd = "-" if r.launches_backward is None else str(r.launches_backward)
        lines.append(f"| {r.case} | {r.variant} | {r.median_us:.1f} | {r.vs_mse_loss:.2f} | {fwd} | {bwd} |")
    return "\n".join(lines) + "\n"


def write(rows: list[SeedRow], device: torch.device, out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / (file_stem(device) + "-seed-shapes")
    stem.with_suffix(".md").write_text(markdown(rows, device, command))
    payload = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
               "threads": torch.get_num_threads(), "command": command, "rows": [asdict(r) for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return stem.with_suffix(".md")
