"""What a loss over a process group costs next to the same loss on the rank's own slice.

``python bench/distributed.py [--world 2] [--device cpu|cuda]`` starts ``world`` processes (gloo
on CPU, NCCL on CUDA: one GPU per rank) and, for each of the seed systems' shapes
(``seed_shapes.CASES``, the global batch split as evenly as possible), times on every rank a
forward+backward of:

  local        the loss module on the rank's slice alone (what a per-rank loss costs)
  over group   the same module with ``process_group`` set (the whole batch's loss)
  collectives  the collectives ``over group`` adds, alone: one all_reduce of the term means
               and column sums (PVA, blendshape), or the row-count exchange and the gather
               of scores, logits and labels (score)

Each variant runs ``iterations`` calls between two barriers, every rank in lockstep; a round's
time is the slowest rank's, and each variant keeps its best round. Writes
bench/results/distributed-<device>-W<world>.{md,json}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import backends
from ..core import distributed
from ..trainers.distributed import rows_of
from . import device_name, file_stem, seed_shapes


def _stats_width(case: seed_shapes.SeedCase, predictions) -> int:
    """The length of the all_reduce a loss over a group makes (its terms, column sums, count)."""
    module = case.module("reference")
    if case.name.startswith("pva"):
        return len(module.config.term_names()) + 2
    pred = predictions[0]
    columns = pred[0].numel() if module.config.groups is None else 0
    return sum(module.config.nonzero) + 2 * columns + 1


def _variants(case: seed_shapes.SeedCase, backend: str, device: torch.device, world: int, rank: int):
    group = dist.group.WORLD
    predictions, constants = case.make(device)
    rows = rows_of(predictions[0].shape[0], world, rank)
    predictions = tuple(p[rows].contiguous() for p in predictions)
    constants = tuple(c[rows].contiguous() for c in constants)
    leaves = tuple(p.detach().requires_grad_() for p in predictions)
    local = case.module(backend).to(device)
    over = case.module(backend).to(device)
    over.process_group = group

    def step(module):
        return lambda: torch.autograd.grad(case.loss(module, *leaves, *constants), leaves)

    if case.name.startswith("score"):
        scores, logits = predictions
        labels = constants[0]

        def collectives():
            distributed.gather_batch([scores.reshape(-1), labels.reshape(-1), logits], group)
    else:
        stats = torch.zeros(_stats_width(case, predictions), device=device)

        def collectives():
            dist.all_reduce(stats, group=group)
    return {"local": step(local), "over group": step(over), "collectives": collectives}


def _time(fn, device: torch.device, iterations: int) -> float:
    """Microseconds per call, the slowest rank's."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iterations * 1e6], dtype=torch.float64)
    dist.all_reduce(elapsed.to(device) if device.type == "cuda" else elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def run(device: torch.device, *, rounds: int = 5, iterations: int = 100, cases=seed_shapes.CASES, log=print):
    world, rank = dist.get_world_size(), dist.get_rank()
    names = [b for b in backends.available(device.type) if b != "reference" and not (b == "triton"
                                                                                       and device.type == "cpu")]
    rows = []
    for case in cases:
        for backend in names:
            variants = _variants(case, backend, device, world, rank)
            for fn in variants.values():  # warm-up: plans, host twin groups, caches
                for _ in range(3):
                    fn()
            best = {name: float("inf") for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    best[name] = min(best[name], _time(fn, device, iterations))
            row = {"case": case.name, "backend": backend, "world": world, **{f"{k}_us": v for k, v in best.items()}}
            row["added_us"] = row["over group_us"] - row["local_us"]
            rows.append(row)
            if rank == 0:
                log(f"  {case.name:>28s} {backend:6s} local {best['local']:9.1f} us  over group "
                    f"{best['over group']:9.1f} us  collectives {best['collectives']:9.1f} us")
    return rows


def markdown(rows: list[dict], device: torch.device, world: int, command: str) -> str:
    lines = [
        f"# Losses over a process group: {device_name(device)}, {world} ranks",
        "",
        f"- torch {torch.__version__}, float32, {torch.get_num_threads()} CPU threads per rank, "
        f"{'NCCL' if device.type == 'cuda' else 'gloo'}",
        "- forward+backward of one call on each rank's slice of the seed shape's global batch; the slowest "
        "rank's time, best of interleaved rounds",
        "- local: the rank's slice alone; over group: the whole batch's loss (process_group set); "
        "collectives: what over group adds, alone",
        f"- command: `{command}`",
        "",
        "| case | backend | local us | over group us | added us | collectives alone us |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['backend']} | {r['local_us']:.1f} | {r['over group_us']:.1f} | "
                     f"{r['added_us']:.1f} | {r['collectives_us']:.1f} |")
    return "\n".join(lines) + "\n"


def worker(rank: int, world: int, device_type: str, init_file: str, out_dir: str, rounds: int, iterations: int,
           command: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        rows = run(device, rounds=rounds, iterations=iterations, log=print)
        if rank == 0 and out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = out / f"distributed-{file_stem(device)}-W{world}"
            stem.with_suffix(".md").write_text(markdown(rows, device, world, command))
            stem.with_suffix(".json").write_text(json.dumps({"device": device_name(device), "world": world,
                                                             "command": command, "rows": rows}, indent=1))
            print(f"wrote {stem.with_suffix('.md')}")
    finally:
        dist.destroy_process_group()


def launch(world: int, device_type: str, out_dir: str | None, *, rounds: int = 5, iterations: int = 100,
           command: str = "python bench/distributed.py") -> None:
    """Run the benchmark on ``world`` new processes (the rendezvous is a file in a temporary folder)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, device_type, os.path.join(tmp, "rendezvous"), out_dir or "", rounds,
                                         iterations, command), nprocs=world, start_method="spawn")
