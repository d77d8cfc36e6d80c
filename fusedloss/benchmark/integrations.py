"""The loss in the seed systems' own call forms (``fusedloss.integrations``), timed in their setting.

``python bench/integrations.py [--device cpu|cuda]``: one forward+backward (the loss, then
``torch.autograd.grad`` with respect to the model outputs) at each system's training batch, of the
original loss where it is installed (the published TIGAS package), of our integration on each
fused backend, and of our reference backend. Variants are timed in interleaved rounds; each keeps
its best round's median. Writes bench/results/integrations-<device>.{md,json}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .. import backends
from . import device_name, file_stem
from .seed_shapes import best_of_rounds


def _grad_step(loss: Callable, outputs: tuple[torch.Tensor, ...]):
    leaves = tuple(x.detach().requires_grad_() for x in outputs)
    return lambda: torch.autograd.grad(loss(*leaves), leaves)


def tigas_cases(device: torch.device, batch: int = 32) -> tuple[str, dict[str, Callable]]:
    """TIGAS's ``losses = loss_fn(outputs, labels); losses["total"].backward()`` at ``batch`` images."""
    from ..integrations import tigas

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(batch, 1, generator=g).to(device)
    logits = torch.randn(batch, 2, generator=g).to(device)
    labels = (torch.rand(batch, 1, generator=g) > 0.5).float().to(device)

    def call(loss_fn):
        return _grad_step(lambda s, lg: loss_fn({"score": s, "logits": lg}, labels)["total"], (scores, logits))

    variants = {}
    try:
        variants["tigas-metric 0.2.1 TIGASLoss"] = call(tigas.import_training().losses.TIGASLoss().to(device))
    except ModuleNotFoundError:
        pass
    for backend in _fused(device):
        for pairs in ("sampled", "all"):
            variants[f"ours pairs={pairs!r} {backend}"] = call(tigas.TIGASLoss(pairs=pairs, backend=backend).to(device))
    variants["ours pairs='all' reference"] = call(tigas.TIGASLoss(backend="reference").to(device))
    return f"TIGAS B={batch}", variants


def ditto_cases(device: torch.device, batch: int = 8) -> tuple[str, dict[str, Callable]]:
    """Ditto's ``loss, loss_dict = p_losses(...)`` loss part at its shape [B, 80, 265], last-frame
    term on (its train.sh), through ``integrations.ditto.pva_loss_dict``; the reference backend is
    Ditto's per-part loop of small PyTorch ops."""
    from ..integrations import ditto

    g = torch.Generator().manual_seed(0)
    pred, gt = (torch.randn(batch, 80, 265, generator=g).to(device) for _ in range(2))
    cond = torch.randn(batch, 265, generator=g).to(device)

    def call(backend):
        return _grad_step(lambda p: sum(ditto.pva_loss_dict(p, gt, ditto.DEFAULT_PART_W_DICT, True, cond_frame=cond,
                                                            backend=backend).values()), (pred,))

    variants = {"reference (Ditto's per-part loop)": call("reference")}
    variants.update({f"ours {b}": call(b) for b in _fused(device)})
    return f"Ditto [{batch}, 80, 265]", variants


def koemorph_cases(device: torch.device, batch: int = 16) -> tuple[str, dict[str, Callable]]:
    """KoeMorph's ``src/train.py`` call ``loss, metrics = loss_fn(pred, target)`` at [B, 52]. The
    reference backend stands in for the repository's plain-PyTorch loss (the same terms)."""
    from ..integrations import koemorph

    g = torch.Generator().manual_seed(0)
    pred, target = (torch.rand(batch, 52, generator=g).to(device) for _ in range(2))

    def call(backend, metrics):
        loss_fn = koemorph.KoeMorphLoss(metrics=metrics, backend=backend).to(device)
        return _grad_step(lambda p: loss_fn(p, target)[0], (pred,))

    variants = {"reference, float metrics (its form)": call("reference", "floats")}
    for b in _fused(device):
        variants[f"ours {b}, float metrics"] = call(b, "floats")
        variants[f"ours {b}, tensor metrics"] = call(b, "tensors")
    return f"KoeMorph [{batch}, 52]", variants


def _fused(device: torch.device) -> list[str]:
    return [b for b in ("cuda", "triton", "cpu") if backends.unavailable_reason(b, device.type) is None
            and not (b == "triton" and device.type == "cpu")]


CASES = (tigas_cases, koemorph_cases, ditto_cases)


def run(device: torch.device, *, rounds: int = 5, min_run_time: float = 0.1, cases=CASES, log=print) -> list[dict]:
    rows = []
    for make in cases:
        name, variants = make(device)
        best = best_of_rounds(variants, device, rounds, min_run_time)
        first = next(iter(best.values()))
        for v, us in best.items():
            rows.append({"case": name, "variant": v, "median_us": us, "vs_first": first / us})
            log(f"  {name:>14s} {v:36s} {us:9.1f} us  {first / us:5.2f}x")
    return rows


def write(rows: list[dict], device: torch.device, out_dir: Path, command: str) -> Path:
    lines = [f"# The loss in the seed systems' call forms: {device_name(device)}", "",
             f"- torch {torch.__version__}, float32, forward+backward of one call; best of interleaved rounds",
             "- speed-up: against the first variant of the case (the original loss where installed)",
             f"- command: `{command}`", "",
             "| case | variant | median us | speed-up |", "|---|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['variant']} | {r['median_us']:.1f} | {r['vs_first']:.2f}x |" for r in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"integrations-{file_stem(device)}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"device": device_name(device), "command": command,
                                                     "rows": rows}, indent=1))
    return stem.with_suffix(".md")
