"""Full trainers of KoeMorph, Ditto and TIGAS, on the fused losses.

    from fusedloss.trainers import TrainConfig, train
    result = train("score", TrainConfig(steps=200, backend="auto", out="runs/score"))

``train(name, config)`` with name ``"blendshape"`` (KoeMorph; ``variant=
"sequential"`` for its streams), ``"motion"`` (Ditto) or ``"score"`` (TIGAS). The same runs from the command line: ``fusedloss train {blendshape,motion,score}``.
Each trainer has built-in synthetic data with real structure; ``data=<folder of .npz files>``
trains on real data instead (formats in each module's docstring and ``data.py``).
"""

from __future__ import annotations

from . import blendshape, motion, score
from .engine import Task, TrainConfig, TrainResult
from .engine import train as run_task

TASKS = {"blendshape": blendshape.make_task, "motion": motion.MotionTask, "score": score.ScoreTask}

# Per-trainer defaults that differ from TrainConfig's (a size that trains in seconds on a CPU).
DEFAULTS = {
    "blendshape": {"batch": 16, "lr": 1e-3},
    "motion": {"batch": 8, "lr": 1e-3},
    "score": {"batch": 32, "lr": 2e-3, "width": 32},
}


def make_task(name: str, config: TrainConfig) -> Task:
    if name not in TASKS:
        raise ValueError(f"trainer must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name](config)


def config_for(name: str, **options) -> TrainConfig:
    """``TrainConfig`` with the trainer's defaults, overridden by ``options``."""
    if name not in TASKS:
        raise ValueError(f"trainer must be one of {', '.join(TASKS)}, got {name!r}")
    return TrainConfig(**{**DEFAULTS[name], **options})


def train(name: str, config: TrainConfig | None = None, **options) -> TrainResult:
    """Train the system ``name``; ``options`` are ``TrainConfig`` fields (with the trainer's
    defaults) when no ``config`` is given."""
    if config is not None and options:
        raise TypeError("give either a TrainConfig or keyword options, not both")
    config = config or config_for(name, **options)
    return run_task(make_task(name, config), config)


__all__ = ["TASKS", "Task", "TrainConfig", "TrainResult", "config_for", "make_task", "train"]
