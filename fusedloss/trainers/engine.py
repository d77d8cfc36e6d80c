"""The training loop the three trainers (KoeMorph, Ditto, TIGAS) share.

A trainer is a ``Task`` (model, data, loss, validation metric: ``blendshape.py``, ``motion.py``,
``score.py``) run by ``train(task, config)``, which owns everything they have in common:
AdamW with a linear warm-up and cosine decay, mixed precision where the device supports it,
gradient accumulation, clipping, KoeMorph's gradient checks, a periodic fused-vs-reference check,
validation, logging (``metrics.py``) and checkpoints that resume exactly.

Determinism: every batch is a pure function of ``(seed, micro-batch number)`` and validation draws
nothing from the global RNG, so a run resumed from a checkpoint (which holds the model, optimiser,
scheduler, scaler, global RNG and the task's own state) continues bit-for-bit as if never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed, metrics


@dataclass
class TrainConfig:
    """Everything a run depends on. The fields above ``log_every`` define the run: a resumed run
    must repeat them (``steps`` may grow). The rest only say what to record and where."""

    steps: int = 200
    batch: int = 16
    backend: str = "auto"          # the fused loss's backend: auto | triton | cuda | cpu | reference
    device: str = "auto"           # auto (cuda if available) | cpu | cuda | cuda:N
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 10               # steps of linear warm-up before the cosine decay
    clip: float = 1.0              # max gradient norm (KoeMorph's); 0 turns clipping off
    accum: int = 1                 # micro-batches per optimiser step
    amp: str = "auto"              # auto (bf16, else fp16, on CUDA; off on CPU) | off | bf16 | fp16
    width: int = 64                # model width (channels / d_model)
    window: int = 0                # frames of context per sample; 0: the task's default
    variant: str = ""              # task-specific ("sequential" for the blendshape trainer)
    data: str | None = None        # folder of real data files (see each task); None: synthetic
    log_every: int = 10
    val_every: int = 50
    ckpt_every: int = 100
    check_reference: int = 0       # every N steps compare the fused loss with the reference; 0: never
    grad_checks: bool = False      # KoeMorph's missing / zero / exploding gradient checks
    out: str | None = None         # output folder (metrics, checkpoint, plot); None: nothing written
    resume: bool = False           # continue from <out>/checkpoint.pt when it exists
    progress: bool = True          # progress bar (tqdm when installed)
    tensorboard: bool = True       # also log to TensorBoard when it is installed
    extra: dict = field(default_factory=dict)   # task-specific settings

    RUN_FIELDS = ("batch", "backend", "seed", "lr", "weight_decay", "warmup", "clip", "accum", "amp", "width",
                  "window", "variant", "data", "extra")


class Task:
    """One trained system: subclasses define the model, data, loss and validation metric.

    ``forward`` returns the loss's keyword arguments (the *loss inputs*), so the engine can
    recompute the same loss with the reference backend on them (``--check-reference``).
    """

    name = ""
    metric = ""                    # the validation metric that must improve
    higher_is_better = False

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.rows = slice(None)    # this rank's rows of every global batch (all of them in one process)

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch (every tensor of ``batch`` is [batch, ...])."""
        if self.rows == slice(None):
            return batch
        return {k: v[self.rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def merge_states(self, states: list[dict]) -> dict:
        """The state to checkpoint from every rank's ``state_dict()`` (rank order); a task whose
        state lives per row keeps each rank's rows (``rows_by_rank``, set by the engine)."""
        return states[0]

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def make_loss(self, backend: str) -> nn.Module:
        raise NotImplementedError

    def batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Micro-batch number ``index``: a pure function of (seed, index)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, loss_fn: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def schedule(self, step: int, loss_fn: nn.Module) -> dict[str, float]:
        """Set step-dependent loss weights on ``loss_fn``; returns the values to log."""
        return {}

    def summary(self, terms: dict[str, float]) -> dict[str, float]:
        """The few numbers shown on the progress bar."""
        return terms

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    model: nn.Module
    records: list[dict]            # every logged record (train, val, reference checks)
    metric: str                    # the task's validation metric
    higher_is_better: bool
    step_ms: float                 # median wall time of an optimiser step, milliseconds
    out: Path | None

    def metric_history(self, name: str | None = None) -> list[float]:
        """Values of a validation metric (default: the task's) in step order."""
        name = name or self.metric
        return [r[name] for r in self.records if r["split"] == "val" and name in r]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: no CUDA device is available here")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU has it, else fp16 (with loss scaling); off on CPU
    unless asked (bf16 autocast on CPU works but is slower than float32 on most CPUs)."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"amp must be one of auto, off, bf16, fp16, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def warmup_cosine(warmup: int, steps: int):
    """lr factor at optimiser step s: linear warm-up to 1 over ``warmup`` steps, then cosine to 0."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))
    return factor


class GradientChecks:
    """KoeMorph's gradient checks, per parameter: no gradient, a zero gradient, or a norm above ``limit``.

    One ``torch._foreach_norm`` per step gives every parameter's gradient norm in a single
    multi-tensor launch; the running min/max stay on the device and are read once per report
    (not a Python loop of ``.item()`` syncs). Norms are taken before clipping."""

    def __init__(self, model: nn.Module, limit: float = 10.0) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.missing: set[str] = set()
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def update(self) -> None:
        present = [(n, p.grad) for n, p in self.named if p.grad is not None]
        self.missing |= {n for n, p in self.named if p.grad is None}
        if len(present) != len(self.named):   # rare: keep per-name bookkeeping simple
            full = {n: g for n, g in present}
            grads = [full.get(n, torch.zeros((), device=p.device)) for n, p in self.named]
        else:
            grads = [g for _, g in present]
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        self.low = norms if self.low is None else torch.minimum(self.low, norms)
        self.high = norms if self.high is None else torch.maximum(self.high, norms)

    def report(self) -> dict[str, list]:
        """Names since the last report (one host read), then reset."""
        names = [n for n, _ in self.named]
        out = {"missing": sorted(self.missing), "zero": [], "exploding": []}
        if self.low is not None:
            low, high = torch.stack([self.low, self.high]).tolist()
            out["zero"] = [n for n, v in zip(names, low) if v == 0 and n not in self.missing]
            out["exploding"] = [f"{n} ({v:.3g})" for n, v in zip(names, high) if not v <= self.limit]
        self.reset()
        return out


def compare_with_reference(task: Task, loss_fn: nn.Module, reference_fn: nn.Module,
                           inputs: dict) -> dict[str, float]:
    """The fused and the reference loss on the same loss inputs (detached copies): the largest
    relative error over the terms, and over the gradients of the total to every input that
    requires grad. Relative to the largest magnitude of each quantity."""
    def run(fn):
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()}
        total, terms = task.loss(fn, leaves)
        wrt = [v for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(total, wrt, allow_unused=True) if wrt else []
        return terms, grads

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

    terms, grads = run(loss_fn)
    ref_terms, ref_grads = run(reference_fn)
    term_err = max(rel(terms[k], ref_terms[k]) for k in ref_terms)
    grad_err = max((rel(g, r) for g, r in zip(grads, ref_grads) if g is not None and r is not None), default=0.0)
    return {"reference_term_err": term_err, "reference_grad_err": grad_err}


def reference_tolerance(inputs: dict) -> float:
    dtypes = {v.dtype for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return 2e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-4


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then an atomic rename: a crash
    leaves either the old checkpoint or the new one, never a torn file."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_config(config: TrainConfig) -> None:
    for name in ("steps", "batch", "accum", "log_every", "val_every", "ckpt_every", "width"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("warmup", "check_reference", "window"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if config.clip < 0 or config.lr <= 0:
        raise ValueError(f"clip must be >= 0 and lr > 0, got clip={config.clip}, lr={config.lr}")
    if config.resume and not config.out:
        raise ValueError("resume=True needs an output folder (out) holding checkpoint.pt")


def _resume(path: Path, config: TrainConfig, model, optimizer, scheduler, scaler, task, ranks=None) -> int:
    """Load every piece of state from ``path``; returns the step it was saved at."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state["config"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(config, k)!r}"
              for k in TrainConfig.RUN_FIELDS if saved.get(k) != getattr(config, k)]
    world = 1 if ranks is None else ranks.world
    if state.get("world", 1) != world:   # each rank's RNG (its dropout masks) continues its own sequence
        differ.append(f"ranks: checkpoint {state.get('world', 1)}, now {world}")
    if differ:
        raise ValueError(f"cannot resume {path}: the run's settings differ ({'; '.join(differ)})")
    if config.steps < state["step"]:
        raise ValueError(f"steps={config.steps} is below the checkpoint's step {state['step']}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scheduler.lr_lambdas[0] = warmup_cosine(config.warmup, config.steps)
    scaler.load_state_dict(state["scaler"])
    task.load_state_dict(state["task"])
    _set_rng_state(state["rng"] if ranks is None else state["rng_by_rank"][ranks.rank])
    return state["step"]


def train(task: Task, config: TrainConfig | None = None) -> TrainResult:
    """Train ``task`` for ``config.steps`` optimiser steps; returns the model and the records.

    Under torchrun (or in an initialised process group of several ranks) it trains data-parallel:
    trainers/distributed.py."""
    config = config or task.config
    _check_config(config)
    ranks, device = distributed.join(resolve_device(config.device))
    try:
        result = _train(task, config, ranks, device)
    except BaseException:
        distributed.leave(ranks, finished=False)
        raise
    distributed.leave(ranks, finished=True)
    return result


def _train(task: Task, config: TrainConfig, ranks, device: torch.device) -> TrainResult:
    main = ranks is None or ranks.main
    out = Path(config.out) if config.out else None
    if out and main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt" if out else None

    torch.manual_seed(config.seed)
    model = task.build_model().to(device)
    loss_fn = task.make_loss(config.backend).to(device)
    reference_fn = task.make_loss("reference").to(device) if config.check_reference else None
    trained = model   # the module itself, for state dicts and validation (no collectives)
    if ranks is not None:
        if config.batch < ranks.world:
            raise ValueError(f"batch must be at least the number of ranks ({ranks.world}), got {config.batch}")
        task.rows = distributed.rows_of(config.batch, ranks.world, ranks.rank)
        task.rows_by_rank = [distributed.rows_of(config.batch, ranks.world, r) for r in range(ranks.world)]
        model = distributed.wrap(model, device)
        trained = model.module
        for fn in (loss_fn, reference_fn):
            if fn is not None:
                fn.process_group = ranks.group   # the loss of the whole global batch on every rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup, config.steps))
    autocast_dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    checks = GradientChecks(trained) if config.grad_checks else None

    world = 1 if ranks is None else ranks.world
    start = 0
    if config.resume and checkpoint.exists():
        start = _resume(checkpoint, config, trained, optimizer, scheduler, scaler, task, ranks)
    # Rank 0 alone writes (metrics, plots, TensorBoard, checkpoints) and validates.
    log = metrics.MetricsLog(out if main else None, keep_until=start if start else None,
                             tensorboard=config.tensorboard and main)
    if out and main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))

    def validate(step: int) -> None:
        if not main:
            return
        trained.eval()
        with torch.no_grad(), torch.autocast(device.type, autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            values = task.validate(trained, device)
        log.write({"step": step, "split": "val", **values})

    def save(step: int) -> None:
        if checkpoint is None:
            return
        task_state, rng = task.state_dict(), _rng_state()
        if ranks is not None:   # every rank's rows of the task's state, and every rank's RNG (dropout)
            states = distributed.gather_objects((task_state, rng))
            task_state, rng = task.merge_states([s for s, _ in states]), states[0][1]
            rng_by_rank = [r for _, r in states]
        if main:
            save_atomically({"step": step, "config": dataclasses.asdict(config), "model": trained.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "task": task_state, "rng": rng, "world": world,
                             **({"rng_by_rank": rng_by_rank} if ranks is not None else {})},
                            checkpoint)

    if start == 0:
        validate(0)
    bar = metrics.progress(config.steps, start, f"{task.name} [{config.backend}]",
                           enabled=config.progress and main)
    step_times: list[float] = []
    interval_sum: dict[str, torch.Tensor] = {}
    interval_steps, interval_time = 0, 0.0
    try:
        for step in range(start, config.steps):
            tick = time.perf_counter()
            scheduled = task.schedule(step, loss_fn)
            if reference_fn is not None:
                task.schedule(step, reference_fn)
            model.train()
            for micro in range(config.accum):
                batch = task.shard(task.batch(step * config.accum + micro, device))
                # DDP averages the gradients once per optimiser step, at the last micro-batch.
                sync = ranks is None or micro == config.accum - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), \
                        torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    inputs = task.forward(model, batch, step)
                    total, terms = task.loss(loss_fn, inputs)
                    terms = {**terms, "total": total}
                if reference_fn is not None and micro == 0 and (step + 1) % config.check_reference == 0:
                    check_start = time.perf_counter()
                    errors = compare_with_reference(task, loss_fn, reference_fn, inputs)
                    if ranks is not None:   # (gradients are per rank: every rank decides alike)
                        errors = distributed.max_over_ranks(errors, device)
                    tick += time.perf_counter() - check_start   # the step time excludes the check
                    log.write({"step": step + 1, "split": "reference", **errors})
                    tolerance = reference_tolerance(inputs)
                    if max(errors.values()) > tolerance:
                        raise RuntimeError(f"{task.name}: the fused loss ({config.backend}) differs from the "
                                           f"reference at step {step + 1}: {errors} (tolerance {tolerance})")
                with contextlib.nullcontext() if sync else model.no_sync():
                    scaler.scale(total / config.accum).backward()
                for k, v in terms.items():
                    v = v.detach().float() / config.accum
                    interval_sum[k] = interval_sum[k] + v if k in interval_sum else v
            scaler.unscale_(optimizer)
            if checks is not None:
                checks.update()
            if config.clip:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.clip)
                interval_sum["grad_norm"] = interval_sum.get("grad_norm", 0) + grad_norm.detach().float()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            interval_steps += 1
            done = step + 1
            last = done == config.steps
            log_now = done % config.log_every == 0 or last
            if log_now:   # one sync per interval, before the clock stops, so the time includes the device's work
                names = list(interval_sum)
                values = torch.stack([interval_sum[k] for k in names]).div(interval_steps).tolist()
            interval_time += time.perf_counter() - tick
            if log_now:
                record = dict(zip(names, values))
                if not math.isfinite(record["total"]):   # fail fast (the score loss also checks every step)
                    raise RuntimeError(f"{task.name}: the loss is NaN/Inf at step {done} ({record})")
                step_ms = 1000 * interval_time / interval_steps
                step_times.append(step_ms)
                log.write({"step": done, "split": "train", "lr": lr, "step_ms": step_ms, **scheduled, **record})
                if checks is not None:
                    found = checks.report()
                    if any(found.values()) and main:
                        log.write({"step": done, "split": "gradients", **{k: len(v) for k, v in found.items()}})
                        bar.write(f"step {done}: gradient check: " + "; ".join(
                            f"{k}: {', '.join(v)}" for k, v in found.items() if v), file=sys.stderr)
                bar.set_postfix({k: f"{v:.4g}" for k, v in task.summary(record).items()})
                interval_sum, interval_steps, interval_time = {}, 0, 0.0
            bar.update(1)
            if done % config.val_every == 0 or last:
                validate(done)
            if done % config.ckpt_every == 0 or last:
                save(done)
    finally:
        bar.close()
        log.close()
    step_ms = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
    return TrainResult(model=trained, records=log.records, metric=task.metric, higher_is_better=task.higher_is_better,
                       step_ms=step_ms, out=out)
