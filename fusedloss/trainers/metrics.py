"""What a training run records: ``metrics.jsonl`` (one JSON object per record, appended as it
happens), ``metrics.csv`` (the same records as a table, written when the run ends), TensorBoard
events when ``tensorboard`` is installed, ``losses.png`` (the loss curves and the validation
metrics, when ``matplotlib`` is installed) and a progress bar (``tqdm`` when installed).

A record is ``{"step": int, "split": "train" | "val" | "reference" | "gradients", name: number...}``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


class MetricsLog:
    """Records in memory and, with a folder, on disk. ``keep_until=N`` (a resumed run) keeps the
    file's records up to step N and drops later ones, which the resumed run will write again."""

    def __init__(self, out: Path | None, keep_until: int | None = None, tensorboard: bool = True) -> None:
        self.out = out
        self.records: list[dict] = []
        self.jsonl = out / "metrics.jsonl" if out else None
        if self.jsonl is not None:
            if keep_until is not None and self.jsonl.exists():
                old = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
                self.records = [r for r in old if r["step"] <= keep_until]
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.writer = None
        if out is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:   # tensorboard not installed: JSONL and CSV only
                pass
            else:
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=keep_until)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.out is None or not self.records:
            return
        write_csv(self.records, self.out / "metrics.csv")
        plot(self.records, self.out / "losses.png")


def write_csv(records: list[dict], path: Path) -> None:
    columns = ["step", "split"] + sorted({k for r in records for k in r} - {"step", "split"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def plot(records: list[dict], path: Path) -> bool:
    """The training loss terms (log scale) and the validation metrics against the step, as a PNG.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    skip = {"step", "split", "lr", "step_ms", "grad_norm", "stride"}
    terms = [k for k in dict.fromkeys(k for r in train for k in r) if k not in skip]
    curves = {k: [k] for k in terms}
    if len(terms) > 9:   # many terms (PVA has 24 "{part}_{kind}"): the total and one sum per kind
        kinds = dict.fromkeys(k.rsplit("_", 1)[-1] for k in terms if k != "total")
        curves = {"total": ["total"], **{f"sum of *_{kind}": [k for k in terms if k.endswith(f"_{kind}")]
                                         for kind in kinds}}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, keys in curves.items():
        points = [(r["step"], sum(r[k] for k in keys)) for r in train if all(k in r for k in keys)]
        points = [(s, v) for s, v in points if v > 0]
        if points:
            axes[0].plot(*zip(*points), label=label, linewidth=2.2 if label == "total" else 1.2)
    axes[0].set(yscale="log", xlabel="step", title="training loss terms")
    axes[0].legend(fontsize=8)
    for key in dict.fromkeys(k for r in val for k in r):
        if key not in ("step", "split"):
            axes[1].plot([r["step"] for r in val if key in r], [r[key] for r in val if key in r], "o-", label=key)
    axes[1].set(xlabel="step", title="validation")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _PlainProgress:
    """A stand-in for tqdm: a line per ``set_postfix`` call."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        self.n, self.total, self.desc, self.enabled = initial, total, desc, enabled

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix(self, values: dict) -> None:
        if self.enabled:
            print(f"{self.desc} {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in values.items()),
                  file=sys.stderr)

    def write(self, line: str, file=sys.stderr) -> None:
        print(line, file=file)

    def close(self) -> None:
        pass


def progress(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar showing the running loss terms (``set_postfix``), or plain lines without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, initial, desc, enabled)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)
