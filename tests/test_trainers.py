"""The trainers: learning, parity of every fused backend with the reference loss, exact resume,
atomic checkpoints, the reference and gradient checks, fail-fast, real data, the command line."""

import json
import math

import numpy as np
import pytest
import torch

from fusedloss import backends
from fusedloss.__main__ import main
from fusedloss.trainers import TrainConfig, config_for, engine, make_task, train

# Tiny sizes: every trainer step runs in milliseconds here (and under the Triton interpreter).
TINY = {
    "blendshape": {"batch": 4, "width": 16, "window": 24},
    "sequential": {"batch": 4, "width": 16, "window": 24, "variant": "sequential"},
    "motion": {"batch": 2, "width": 16, "window": 12},
    "score": {"batch": 8, "width": 8, "accum": 2},
}
QUIET = {"progress": False, "tensorboard": False}


def trainer_of(case: str) -> str:
    return "blendshape" if case == "sequential" else case


def run(case: str, **options):
    config = config_for(trainer_of(case), **{**TINY[case], **QUIET, **options})
    return train(trainer_of(case), config)


def fused_backends_here():
    params = []
    for backend in ("cpu", "triton"):
        reason = backends.unavailable_reason(backend, "cpu")
        params.append(pytest.param(backend, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


# What a short run must reach, from the metric at step 0 (measured: every one clears its bar
# with room; see the README's training table).
LEARNING = {
    "blendshape": ({}, 80, lambda first, last: last < 0.5 * first),
    "sequential": ({}, 80, lambda first, last: last < 0.6 * first),
    "motion": ({}, 80, lambda first, last: last < 0.85 * first),
    "score": ({"accum": 2}, 60, lambda first, last: last > first + 0.25),
}


@pytest.mark.parametrize("case", list(LEARNING))
def test_validation_metric_improves(case):
    options, steps, improved = LEARNING[case]
    config = config_for(trainer_of(case), steps=steps, val_every=steps, **({"variant": "sequential"} if case == "sequential" else {}),
                        **options, **QUIET)
    result = train(trainer_of(case), config)
    history = result.metric_history()
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    assert improved(history[0], history[-1]), (case, history)


@pytest.mark.parametrize("backend", fused_backends_here())
@pytest.mark.parametrize("case", list(TINY))
def test_fused_training_matches_reference(case, backend):
    """Same seed, same steps: every step's loss terms and the final weights agree with the run
    on the reference loss."""
    steps = 3
    fused = run(case, steps=steps, backend=backend, log_every=1, val_every=steps)
    reference = run(case, steps=steps, backend="reference", log_every=1, val_every=steps)
    train_records = [[r for r in result.records if r["split"] == "train"] for result in (fused, reference)]
    assert len(train_records[0]) == steps
    for got, want in zip(*train_records, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            if key == "step_ms":
                continue
            if isinstance(want[key], str):   # "split" (pytest.approx takes numbers only since pytest 9.2)
                assert got[key] == want[key], (key, got, want)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, got, want)
    for (name, a), b in zip(fused.model.state_dict().items(), reference.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(TINY))
def test_resume_continues_exactly(case, tmp_path):
    """A run killed after its step-3 checkpoint, resumed, ends bit-for-bit like one never stopped."""
    options = {"steps": 6, "log_every": 1, "val_every": 3, "ckpt_every": 3, "warmup": 2}
    straight = run(case, **options, out=str(tmp_path / "straight"))

    config = config_for(trainer_of(case), **{**TINY[case], **QUIET, **options, "out": str(tmp_path / "resumed")})
    task = make_task(trainer_of(case), config)
    batch = task.batch

    def dies_in_step_5(index, device):
        if index >= 4 * config.accum:
            raise KeyboardInterrupt
        return batch(index, device)

    task.batch = dies_in_step_5
    with pytest.raises(KeyboardInterrupt):
        engine.train(task, config)
    resumed = run(case, **options, out=str(tmp_path / "resumed"), resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    def history(folder):
        records = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "step_ms"} for r in records]

    assert history("resumed") == history("straight")
    assert [r["step"] for r in history("resumed") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    run("score", steps=4, log_every=1, ckpt_every=2, val_every=100, out=str(tmp_path))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4
    state["step"] = 2   # as if the run had died after logging steps 3 and 4
    engine.save_atomically(state, tmp_path / "checkpoint.pt")
    run("score", steps=2, log_every=1, out=str(tmp_path / "ref"))
    result = run("score", steps=4, log_every=1, ckpt_every=2, val_every=100, out=str(tmp_path), resume=True)
    steps = [r["step"] for r in result.records if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_other_settings(tmp_path):
    run("score", steps=2, out=str(tmp_path))
    with pytest.raises(ValueError, match="lr: checkpoint"):
        run("score", steps=4, out=str(tmp_path), resume=True, lr=0.5)
    with pytest.raises(ValueError, match="below the checkpoint"):
        run("score", steps=1, out=str(tmp_path), resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    engine.save_atomically({"step": 1}, path)

    def torn(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        engine.save_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_check_reference_records_and_catches_a_wrong_loss(monkeypatch):
    result = run("blendshape", steps=4, check_reference=2)
    checks = [r for r in result.records if r["split"] == "reference"]
    assert [r["step"] for r in checks] == [2, 4]
    assert all(r["reference_term_err"] < 1e-5 and r["reference_grad_err"] < 1e-5 for r in checks)

    from fusedloss.trainers import blendshape

    original = blendshape.ClipTask.loss

    def wrong(self, loss_fn, inputs):   # a fused loss 1% off
        total, terms = original(self, loss_fn, inputs)
        return (total * 1.01, terms) if loss_fn.backend != "reference" else (total, terms)

    monkeypatch.setattr(blendshape.ClipTask, "loss", wrong)
    with pytest.raises(RuntimeError, match="differs from the reference at step 2"):
        run("blendshape", steps=4, check_reference=2)


def test_gradient_checks_name_missing_zero_and_exploding():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1),
                                 "dead": torch.nn.Linear(3, 1), "huge": torch.nn.Linear(3, 1)})
    checks = engine.GradientChecks(model, limit=10.0)
    x = torch.ones(2, 3)
    loss = model["used"](x).sum() + 0 * model["dead"](x).sum() + 1e3 * model["huge"](x).sum()
    loss.backward()
    checks.update()
    found = checks.report()
    assert found["missing"] == ["unused.bias", "unused.weight"]
    assert found["zero"] == ["dead.weight", "dead.bias"]
    assert [n.split(" ")[0] for n in found["exploding"]] == ["huge.weight", "huge.bias"]
    assert checks.report() == {"missing": [], "zero": [], "exploding": []}   # reset after a report


def test_gradient_checks_in_training_log_findings(capsys):
    result = run("sequential", steps=2, log_every=1, grad_checks=True)
    # The first step has no previous prediction, so the smoothing factor gets no gradient.
    found = [r for r in result.records if r["split"] == "gradients"]
    assert found and found[0]["step"] == 1 and found[0]["zero"] == 1
    assert "zero: smoothing" in capsys.readouterr().err


def test_score_trainer_fails_fast_on_nan():
    config = config_for("score", **TINY["score"], **QUIET, steps=2)
    task = make_task("score", config)
    build = task.build_model

    def poisoned():
        model = build()
        with torch.no_grad():
            model.score_head[2].bias.fill_(float("nan"))
        return model

    task.build_model = poisoned
    with pytest.raises(RuntimeError, match="NaN/Inf detected in scores"):
        engine.train(task, config)


def test_training_config_is_checked():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run("score", steps=0)
    with pytest.raises(ValueError, match="resume=True needs an output folder"):
        run("score", steps=1, resume=True)
    with pytest.raises(ValueError, match="amp must be one of"):
        run("score", steps=1, amp="fp8")
    with pytest.raises(ValueError, match="trainer must be one of"):
        train("speech", TrainConfig())
    with pytest.raises(ValueError, match="variant must be"):
        run("blendshape", steps=1, variant="dual")
    with pytest.raises(ValueError, match="no CUDA device"):
        if torch.cuda.is_available():
            raise ValueError("no CUDA device (skipped: this machine has one)")
        run("score", steps=1, device="cuda")


def write_npz_folder(folder, files):
    folder.mkdir()
    for i, arrays in enumerate(files):
        np.savez(folder / f"{i:03d}.npz", **arrays)
    return str(folder)


def test_real_data_in_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    blend = write_npz_folder(tmp_path / "blend", [
        {"mel": rng.standard_normal((60, 20)).astype(np.float32), "blendshapes": rng.random((60, 7)).astype(np.float32)}
        for _ in range(3)])
    motion = write_npz_folder(tmp_path / "motion", [
        {"audio": rng.standard_normal((40, 5)).astype(np.float32), "motion": rng.standard_normal((40, 265)).astype(np.float32)}
        for _ in range(3)])
    score = write_npz_folder(tmp_path / "score", [
        {"images": rng.integers(0, 256, (10, 3, 16, 16), dtype=np.uint8), "labels": rng.random(10).astype(np.float32)}
        for _ in range(3)])
    for case, folder in (("blendshape", blend), ("sequential", blend), ("motion", motion), ("score", score)):
        result = run(case, steps=2, data=folder)
        assert all(math.isfinite(v) for r in result.records for k, v in r.items() if isinstance(v, float)), case

    bad = write_npz_folder(tmp_path / "bad", [{"mel": np.zeros((60, 20), np.float32)}] * 2)
    with pytest.raises(ValueError, match=r"000.npz: missing arrays \['blendshapes'\]"):
        run("blendshape", steps=1, data=bad)
    short = write_npz_folder(tmp_path / "short", [{"audio": np.zeros((5, 4), np.float32),
                                                   "motion": np.zeros((5, 265), np.float32)}] * 2)
    with pytest.raises(ValueError, match="common length >= 13"):
        run("motion", steps=1, data=short)
    with pytest.raises(ValueError, match="need at least two .npz files"):
        run("score", steps=1, data=str(tmp_path / "nothing"))


def test_command_line_trains_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "score", "--steps", "4", "--batch", "8", "--width", "8", "--out", str(out), "--log-every", "2",
            "--val-every", "2", "--ckpt-every", "2", "--no-progress", "--check-reference", "2", "--grad-checks"]
    assert main(args) == 0
    assert "val_auc" in capsys.readouterr().out
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "config.json"):
        assert (out / name).exists(), name
    pytest.importorskip("matplotlib")
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*args[:3], "6", *args[4:], "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [2, 4, 6]
    assert "regression" in (out / "metrics.csv").read_text().splitlines()[0]


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    run("score", steps=2, out=str(tmp_path), tensorboard=True)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_lightning_module_trains_like_the_engine():
    """Lightning owns the loop; after three steps its weights equal the engine's."""
    L = pytest.importorskip("lightning")
    from fusedloss.trainers.lightning import TrainerModule

    module = TrainerModule("score", steps=3, backend="cpu", **TINY["score"] | {"accum": 1})
    assert module.loss_fn.backend == "cpu"
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              gradient_clip_val=1.0).fit(module)
    engine_run = run("score", steps=3, backend="cpu", accum=1)
    for (name, a), b in zip(module.model.state_dict().items(), engine_run.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=2)
    trainer.fit(TrainerModule("motion", steps=2, backend="cpu", **TINY["motion"]))
    assert math.isfinite(trainer.callback_metrics["val_x0_mse"].item())


def test_step_time_benchmark_rows():
    from fusedloss.benchmark import trainers as trainer_bench

    runs = [("score", "score", TINY["score"]), ("motion", "motion", TINY["motion"])]
    rows = trainer_bench.step_times(torch.device("cpu"), steps=4, backend_names=["cpu", "reference"], runs=runs,
                                    check_every=2, log=lambda line: None)
    assert [(r["run"], r["backend"]) for r in rows] == [("score", "cpu"), ("score", "reference"),
                                                         ("motion", "cpu"), ("motion", "reference")]
    assert all(r["reference_err"] < 1e-4 for r in rows if r["backend"] == "cpu")
    assert all(r["reference_err"] is None for r in rows if r["backend"] == "reference")
    table = trainer_bench.markdown(rows, "test CPU", "pytest")
    reference_lines = [line for line in table.splitlines() if "| reference |" in line]
    assert len(reference_lines) == 2 and all("| 1.00x |" in line for line in reference_lines)
    # (a fused row may show 1.00x too: at these tiny models the loss is a small part of a step)
