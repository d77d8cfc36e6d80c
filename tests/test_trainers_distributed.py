"""Data-parallel training (trainers/distributed.py) on 2 CPU processes over gloo: a two-rank run of
each system trains the same weights, with the same logged losses, as a one-process run on the
same global batches (uneven slices: 5 samples on 2 ranks); outputs on rank 0 only; exact resume;
``torchrun -m fusedloss train``.

Exactness needs a model without per-rank randomness or batch statistics: dropout 0, and GroupNorm
in the score model (PyTorch has no SyncBatchNorm on the CPU; on CUDA the engine synchronises it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedloss.trainers import config_for, engine, make_task, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Tiny runs with no per-rank randomness in the models (see the module docstring).
CASES = {
    "blendshape": ("blendshape", {"batch": 5, "width": 16, "window": 24, "extra": {"dropout": 0.0}}),
    "sequential": ("blendshape", {"batch": 5, "width": 16, "window": 24, "variant": "sequential",
                                  "extra": {"dropout": 0.0}}),
    "motion": ("motion", {"batch": 3, "width": 16, "window": 12, "extra": {"dropout": 0.0}}),
    "score": ("score", {"batch": 7, "width": 8, "accum": 2, "extra": {"norm": "group"}}),
}
RUN = {"steps": 4, "log_every": 1, "val_every": 2, "ckpt_every": 2, "progress": False, "tensorboard": False,
       "backend": "cpu", "device": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, trainer: str, options: dict, dies_at: int | None) -> None:
    """One torchrun-like process: the engine joins the group from these variables. ``dies_at``:
    the run is killed when it asks for that micro-batch."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = config_for(trainer, **options)
    task = make_task(trainer, config)
    batch = task.batch

    def killed(index, device):
        if dies_at is not None and index >= dies_at:
            raise KeyboardInterrupt
        return batch(index, device)

    task.batch = killed
    try:
        engine.train(task, config)
    except KeyboardInterrupt:
        pass
    assert not dist.is_initialized()   # the engine leaves the group it made


def run_ranks(world: int, trainer: str, options: dict, dies_at: int | None = None) -> None:
    mp.start_processes(_rank, args=(world, free_port(), trainer, options, dies_at), nprocs=world,
                       start_method="spawn")


def train_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(two, one, what: str) -> None:
    """Same logged losses (every train record's terms) and validation metrics, same final weights."""
    records_two, records_one = train_records(two), train_records(one)
    assert [(r["step"], r["split"]) for r in records_two] == [(r["step"], r["split"]) for r in records_one]
    for a, b in zip(records_two, records_one):
        for key, value in b.items():
            if key in ("step_ms", "split", "step", "lr"):
                continue
            assert a[key] == pytest.approx(value, rel=2e-4, abs=1e-6), f"{what}: step {b['step']} {b['split']} {key}"
    weights_two = torch.load(two / "checkpoint.pt", weights_only=False)["model"]
    weights_one = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    for name, w in weights_one.items():
        torch.testing.assert_close(weights_two[name], w, rtol=2e-4, atol=2e-6, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process(tmp_path, case):
    trainer, options = CASES[case]
    run_ranks(2, trainer, {**options, **RUN, "out": str(tmp_path / "two")})
    train(trainer, config_for(trainer, **options, **RUN, out=str(tmp_path / "one")))
    assert_same_run(tmp_path / "two", tmp_path / "one", case)
    # Rank 0 alone writes: one set of files, and the checkpoint knows it came from two ranks.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["world"] == 2


def test_two_ranks_resume_exactly(tmp_path):
    """The sequential trainer keeps per-row state (each stream's previous prediction): a two-rank
    run stopped at step 2 and resumed ends where an uninterrupted two-rank run ends."""
    trainer, options = CASES["sequential"]
    options = {**options, **RUN, "extra": {"dropout": 0.1}}   # dropout on: each rank's RNG must resume too
    run_ranks(2, trainer, {**options, "out": str(tmp_path / "straight")})
    run_ranks(2, trainer, {**options, "out": str(tmp_path / "resumed")}, dies_at=3)   # in step 4
    run_ranks(2, trainer, {**options, "out": str(tmp_path / "resumed"), "resume": True})
    assert_same_run(tmp_path / "resumed", tmp_path / "straight", "resume")
    with pytest.raises(ValueError, match="ranks: checkpoint 2, now 1"):
        train(trainer, config_for(trainer, **{**options, "out": str(tmp_path / "resumed"), "resume": True}))


def test_torchrun_command_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "fusedloss", "train", "score", "--steps", "2", "--batch", "6", "--width", "8", "--norm", "group",
         "--device", "cpu", "--backend", "cpu", "--log-every", "1", "--val-every", "2", "--ckpt-every", "2",
         "--no-progress", "--no-tensorboard", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("val_auc") == 1 and "over 2 ranks" in result.stderr   # rank 0 alone reports
    assert [r["step"] for r in train_records(out) if r["split"] == "train"] == [1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["world"] == 2


def test_lightning_ddp_trains_like_one_process():
    """Lightning's DDP (2 CPU processes, spawned): the weights after three steps equal the
    one-process engine's on the same global batches."""
    L = pytest.importorskip("lightning")
    from fusedloss.trainers.lightning import TrainerModule

    trainer, options = CASES["score"]
    options = {**options, "accum": 1, "backend": "cpu"}
    module = TrainerModule(trainer, steps=3, **options)
    L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0).fit(module)
    one = train(trainer, config_for(trainer, **options, steps=3, progress=False, tensorboard=False, device="cpu"))
    for (name, a), b in zip(module.model.state_dict().items(), one.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_a_finished_run_meets_the_other_ranks_before_leaving(monkeypatch):
    """The engine's teardown: after a finished run a barrier, then the group is destroyed (gloo's
    worker has then released the last collectives' tensors before the process can exit:
    trainers/distributed.py ``leave``); after an error no barrier, which other ranks may never reach."""
    from fusedloss.trainers import distributed

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    ranks = distributed.Ranks(world=2, rank=1, group=None, owns_group=True)
    monkeypatch.setattr(distributed, "join", lambda device: (ranks, device))
    config = config_for("score", **{**CASES["score"][1], **RUN})
    monkeypatch.setattr(engine, "_train", lambda *args: "done")
    assert engine.train(make_task("score", config), config) == "done"
    assert calls == ["barrier", "destroy"]

    def fails(*args):
        raise KeyboardInterrupt

    calls.clear()
    monkeypatch.setattr(engine, "_train", fails)
    with pytest.raises(KeyboardInterrupt):
        engine.train(make_task("score", config), config)
    assert calls == ["destroy"]
