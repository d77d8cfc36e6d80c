"""Training step time of the three trainers (KoeMorph, Ditto, TIGAS) with each loss backend, side by side.

Each trainer runs ``steps`` optimiser steps from the same seed with every available backend
(the fused ones and ``reference``, the plain-PyTorch loss the original code uses); the step time is the
median over log intervals of the wall time of a whole step (data, forward, loss, backward,
optimiser), so the ratio shows what the fused loss saves in a real step, not in the loss alone.
"""

from __future__ import annotations

import torch

from .. import backends
from ..trainers import config_for, train

# (row name, trainer, options): the trainers at their CPU-sized defaults.
RUNS = (
    ("blendshape (KoeMorph)", "blendshape", {}),
    ("blendshape sequential (KoeMorph)", "blendshape", {"variant": "sequential"}),
    ("motion (Ditto)", "motion", {}),
    ("score (TIGAS)", "score", {"accum": 2}),
)


def step_times(device: torch.device, steps: int = 60, backend_names=None, runs=RUNS, check_every: int = 0,
               log=print) -> list[dict]:
    """One row per (trainer, backend): step time, validation metric before and after, and the
    largest fused-vs-reference error seen (with ``check_every`` > 0)."""
    names = backend_names or [b for b in backends.available(device.type) if b != "triton" or device.type == "cuda"]
    rows = []
    for label, trainer, options in runs:
        for backend in names:
            config = config_for(trainer, steps=steps, backend=backend, device=str(device), log_every=10,
                                val_every=steps, ckpt_every=steps, progress=False, tensorboard=False,
                                check_reference=check_every if backend != "reference" else 0, **options)
            result = train(trainer, config)
            history = result.metric_history()
            checks = [r for r in result.records if r["split"] == "reference"]
            row = {"run": label, "backend": backend, "steps": steps, "step_ms": result.step_ms,
                   "metric": result.metric, "before": history[0], "after": history[-1],
                   "improved": history[-1] > history[0] if result.higher_is_better else history[-1] < history[0],
                   "reference_err": max((max(r["reference_term_err"], r["reference_grad_err"]) for r in checks),
                                        default=None)}
            rows.append(row)
            log(f"  {label:34s} {backend:9s} {row['step_ms']:8.2f} ms/step  {result.metric} "
                f"{row['before']:.4f} -> {row['after']:.4f}")
    return rows


def markdown(rows: list[dict], device_name: str, command: str) -> str:
    lines = [f"# Training step time, {device_name}", "", f"`{command}`", "",
             "A whole optimiser step (data, model forward and backward, loss, optimiser), median over "
             "10-step intervals; the same seed and steps for every backend, so the validation metrics "
             "must agree. At the trainers' default (CPU-sized) models the loss is a small part of a "
             "step, and on a shared 2-core machine repeated runs of one backend differ by up to about "
             "30% (seen: the score trainer at 14.9 and 19.4 ms): ratios inside that band are noise, not a speed-up or a slow-down.", "",
             "| trainer | backend | ms / step | vs reference loss | validation metric, start -> end |",
             "|---|---|---:|---:|---|"]
    reference = {r["run"]: r["step_ms"] for r in rows if r["backend"] == "reference"}
    for r in rows:
        ratio = f"{reference[r['run']] / r['step_ms']:.2f}x" if r["run"] in reference else "-"
        lines.append(f"| {r['run']} | {r['backend']} | {r['step_ms']:.2f} | {ratio} | "
                     f"{r['metric']} {r['before']:.4f} -> {r['after']:.4f} |")
    return "\n".join(lines) + "\n"
