"""Command line: ``python -m fusedloss {demo,train,bench}`` (also installed as ``fusedloss``).

demo   the three trainers (KoeMorph, Ditto, TIGAS) trained briefly on their built-in data with the fused losses (and
       with the reference loss, for the step time), the fused losses checked against the
       reference during training and on every backend, then the speed table of this machine.
train  one system's full trainer: ``fusedloss train {blendshape,motion,score} --steps 500``.
bench  the full loss benchmark: the systems' own shapes against one F.mse_loss
       (bench/results/<device>-seed-shapes), then every case on every backend, eager and
       torch.compile, forward / backward / full (bench/results/<device>), markdown and JSON;
       ``--section model``: the H200 model (bench/results/model-h200), no GPU needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch


def _devices(choice: str) -> list[torch.device]:
    if choice == "auto":
        return [torch.device("cuda")] if torch.cuda.is_available() else [torch.device("cpu")]
    return [torch.device(choice)]


def _pva_problem(device: torch.device, batch: int):
    """Ditto's [B, 80, 265] with every term: a function of the backend -> (terms, d/dpred)."""
    from .functional import pva_loss

    g = torch.Generator().manual_seed(0)
    pred, target = (torch.randn(batch, 80, 265, generator=g).to(device) for _ in range(2))
    cond = torch.randn(batch, 265, generator=g).to(device)
    dim_ws = torch.linspace(0.5, 1.5, 265, dtype=torch.float64, device=device)

    def run(backend):
        p = pred.clone().requires_grad_()
        total, terms = pva_loss(p, target, cond, use_last_frame_loss=True, use_reg_loss=True, dim_ws=dim_ws,
                                backend=backend)
        (2.0 * total).backward()
        return {**terms, "total": total}, p.grad

    return run


def _blendshape_problem(device: torch.device, batch: int):
    """KoeMorph's [B, T, 52] with every term: a function of the backend -> (terms, d/dpred)."""
    from .functional import blendshape_loss

    g = torch.Generator().manual_seed(0)
    pred, target, raw, prev = (torch.rand(batch, 16, 52, generator=g).to(device) for _ in range(4))
    matrix = torch.randn(68 * 3, 52, generator=g).to(device) / 8

    def run(backend):
        p = pred.clone().requires_grad_()
        _, terms = blendshape_loss(p, target, raw, prev, temporal_weight=0.2, landmark_weight=0.1,
                                   smoothing_weight=0.1, consistency_weight=0.2, landmark_matrix=matrix,
                                   backend=backend, return_components=True)
        (2.0 * terms["total"]).backward()
        return terms, p.grad

    return run


def _score_problem(device: torch.device, batch: int):
    """TIGAS's scores, logits and labels, 64 per batch element: a function of the backend -> (terms, d/dscores)."""
    from .functional import combined_loss

    g = torch.Generator().manual_seed(0)
    n = 64 * batch
    scores = torch.rand(n, generator=g).to(device)
    logits = torch.randn(n, 2, generator=g).to(device)
    labels = (torch.rand(n, generator=g) < 0.5).float().to(device)

    def run(backend):
        s = scores.clone().requires_grad_()
        total, terms = combined_loss(s, logits, labels, backend=backend)
        (2.0 * total).backward()
        return terms, s.grad

    return run


def check_backends(device: torch.device, batch: int) -> bool:
    """Every fused backend on ``device`` against the reference: every term, the total, d/dpred."""
    from . import backends

    ok = True
    for family, make in (("pva", _pva_problem), ("blendshape", _blendshape_problem), ("score", _score_problem)):
        run = make(device, batch)
        ref_terms, ref_grad = run("reference")
        for backend in backends.available(device.type):
            if backend == "reference":
                continue
            terms, grad = run(backend)
            term_err = max((terms[k] - ref_terms[k]).abs().item() / max(ref_terms[k].abs().item(), 1e-12)
                           for k in ref_terms)
            grad_err = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
            passed = term_err < 1e-4 and grad_err < 1e-4
            ok &= passed
            print(f"  {family:10s} {device.type:4s} {backend:7s} total {terms['total'].item():.6f} "
                  f"(reference {ref_terms['total'].item():.6f}), max rel. error: terms {term_err:.1e}, "
                  f"gradient {grad_err:.1e}  {'OK' if passed else 'MISMATCH'}")
    return ok


def demo(args) -> int:
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton runs, slowly, through its interpreter
    from . import backends, benchmark
    from .benchmark import blendshape as blendshape_bench
    from .benchmark import pva as pva_bench
    from .benchmark import score as score_bench
    from .benchmark import trainers as trainer_bench

    print("fusedloss demo: the fused PVA loss (Ditto), blendshape loss (KoeMorph) and score loss (TIGAS), "
          "every term on\n")
    print(backends.describe(), "\n")
    ok = True
    for device in _devices(args.device):
        steps = args.train_steps
        print(f"Training KoeMorph, Ditto and TIGAS for {steps} steps on {device}, built-in synthetic data; the fused loss "
              f"is compared with the reference every 10 steps (values and gradients):")
        start = time.time()
        rows = trainer_bench.step_times(device, steps=steps, check_every=10)
        for row in rows:
            if row["backend"] == "reference":
                continue
            improved = row["improved"]
            matched = row["reference_err"] is not None and row["reference_err"] < 1e-4
            ok &= improved and matched
            print(f"  {row['run']:34s} {row['backend']}: {row['metric']} {'improved' if improved else 'DID NOT IMPROVE'}, "
                  f"max error vs reference {row['reference_err']:.1e} {'OK' if matched else 'MISMATCH'}")
        print(f"({time.time() - start:.0f} s)\n")
        print(trainer_bench.markdown(rows, benchmark.device_name(device), "python -m fusedloss demo"))
    for device in _devices(args.device):
        print(f"Checking every backend against the reference on {device}:")
        ok &= check_backends(device, batch=8 if device.type == "cuda" else 2)
    print()
    for device in _devices(args.device):
        if device.type == "cuda":
            cases = pva_bench.cases(device) + blendshape_bench.cases(device) + score_bench.cases(device)
        else:  # the CPU goal cases: PVA at B = 64, blendshape at [4096, 52], score at B = 4096
            cases = (pva_bench.cases(device, (64,)) + blendshape_bench.cases(device, (4096,))
                     + score_bench.cases(device, (4096,)))
        start = time.time()
        results, bandwidth = benchmark.run_cases(cases, device, phases=("full",), log=lambda line: None)
        print(f"Speed on {benchmark.device_name(device)} (forward+backward, float32, "
              f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {time.time() - start:.0f} s):")
        print(benchmark.markdown(results, device, bandwidth, torch.float32, "python -m fusedloss demo"))
        print(benchmark.summary(results))
    print("\nall backends match the reference" if ok else "\nSOME BACKENDS DO NOT MATCH THE REFERENCE")
    return 0 if ok else 1


def command_line() -> str:
    """How this process was started, for the results file."""
    if sys.argv[0].endswith("__main__.py"):
        return " ".join(["python -m fusedloss", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def train(args) -> int:
    from . import trainers

    options = {k: v for k, v in vars(args).items()
               if k in {f.name for f in dataclasses.fields(trainers.TrainConfig)} and v is not None}
    options["out"] = args.out or f"runs/{args.trainer}{'-sequential' if args.variant == 'sequential' else ''}"
    options["extra"] = {k: getattr(args, k) for k in ("dropout", "norm") if getattr(args, k) is not None}
    config = trainers.config_for(args.trainer, **options)
    main_rank = os.environ.get("RANK", "0") == "0"   # under torchrun, rank 0 alone reports
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if main_rank:
        print(f"fusedloss train {args.trainer}: {config.steps} steps, batch {config.batch}"
              f"{f' over {ranks} ranks' if ranks > 1 else ''}, loss backend {config.backend}, device {config.device}, "
              f"writing to {config.out}", file=sys.stderr)
    result = trainers.train(args.trainer, config)
    if not main_rank:
        return 0
    history = result.metric_history()
    print(f"{args.trainer}: {result.metric} {history[0]:.5f} -> {history[-1]:.5f} "
          f"({'higher' if result.higher_is_better else 'lower'} is better), {result.step_ms:.1f} ms/step; "
          f"{config.out}/: metrics.jsonl, metrics.csv, losses.png, checkpoint.pt")
    return 0


def _batches_by_family(spec: str | None, families: list[str]) -> dict[str, tuple[int, ...] | None]:
    """``--batches``: "64,4096" takes those batch sizes of every family; "pva:64,score:4096" names a
    family per size (a family with no size named runs no case). None: every family's own sizes."""
    if not spec:
        return {f: None for f in families}
    out: dict[str, list[int]] = {f: [] for f in families}
    for item in spec.split(","):
        family, _, size = item.rpartition(":")
        if family and family not in out:
            raise SystemExit(f"--batches: unknown family {family!r} in {item!r} (families: {', '.join(families)})")
        for f in [family] if family else families:
            out[f].append(int(size))
    return {f: tuple(sizes) for f, sizes in out.items()}


def bench(args) -> int:
    from . import benchmark
    from .benchmark import blendshape as blendshape_bench
    from .benchmark import pva as pva_bench
    from .benchmark import score as score_bench
    from .benchmark import seed_shapes

    if args.section == "model":  # predicted H200 times, from CPU-only measurements (fusedloss/benchmark/model.py)
        from .benchmark import model

        return model.main(["--out", args.out, "--command", command_line()])
    dtype = getattr(torch, args.dtype)
    families = {"pva": pva_bench.cases, "blendshape": blendshape_bench.cases, "score": score_bench.cases}
    chosen = args.family.split(",")
    batches = _batches_by_family(args.batches, chosen)
    for device in _devices(args.device):
        command = command_line()
        if args.section in ("all", "seed-shapes"):
            print(f"# the systems' shapes on {benchmark.device_name(device)}: fused vs one F.mse_loss (forward+backward)")
            rows = seed_shapes.run(device)
            if args.out:
                path = seed_shapes.write(rows, device, Path(args.out), command)
                print(f"wrote {path} and {path.with_suffix('.json')}")
            if args.section == "seed-shapes":
                continue
        cases = [c for f in chosen if batches[f] != () for c in families[f](device, batches[f])]
        written = []

        def write(results, bandwidth):  # after every case: a run cut short keeps what it measured
            if args.out:
                written[:] = [benchmark.write(results, device, bandwidth, dtype, Path(args.out), command)]

        results, _ = benchmark.run_cases(cases, device, dtype=dtype, modes=tuple(args.modes.split(",")),
                                         phases=tuple(args.phases.split(",")), after_case=write)
        if written:
            print(f"wrote {written[0]} and {written[0].with_suffix('.json')}")
        print(benchmark.summary(results))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedloss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="check every backend against the reference, then a short speed table")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train-steps", type=int, default=300, help="optimiser steps per trainer")
    p.set_defaults(func=demo)
    p = sub.add_parser("train", help="train KoeMorph, Ditto or TIGAS with the fused losses",
                       description="Train KoeMorph, Ditto or TIGAS with the fused losses. Writes metrics.jsonl, metrics.csv, "
                                   "losses.png, checkpoint.pt (and TensorBoard events when installed) to --out.")
    p.add_argument("trainer", choices=["blendshape", "motion", "score"])
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--batch", type=int, help="samples per micro-batch (default: the trainer's)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "cpu", "reference"],
                   help="the loss implementation (default auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", help="output folder (default runs/<trainer>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--sequential", dest="variant", action="store_const", const="sequential",
                   help="blendshape: KoeMorph's sequential variant (streams, smoothing, consistency, strides)")
    p.add_argument("--data", help="folder of .npz files to train on instead of the built-in synthetic data")
    p.add_argument("--lr", type=float)
    p.add_argument("--accum", type=int, help="micro-batches per optimiser step (gradient accumulation)")
    p.add_argument("--clip", type=float, help="max gradient norm, 0 for none (default 1.0)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision (default auto: on for CUDA)")
    p.add_argument("--width", type=int, help="model width")
    p.add_argument("--window", type=int, help="frames of context (blendshape, motion)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dropout", type=float, help="the model's dropout (blendshape, motion; default 0.1)")
    p.add_argument("--norm", choices=["batch", "group"],
                   help="the score model's normalisation (default batch; group has no batch statistics)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--val-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--check-reference", type=int, metavar="N",
                   help="every N steps, compare the fused loss with the reference (values, gradients)")
    p.add_argument("--grad-checks", action="store_true", default=None,
                   help="KoeMorph's gradient checks: parameters with a missing, zero or exploding gradient")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    p.set_defaults(func=train)
    p = sub.add_parser("bench", help="the full benchmark, written to bench/results/")
    p.add_argument("--family", default="pva,blendshape,score", help="comma-separated loss families")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batches", default=None,
                   help="comma-separated batch sizes B: only the cases with these; FAMILY:B for one family's")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--phases", default="forward,backward,full")
    p.add_argument("--out", default="bench/results", help="folder for <device>.md/.json ('' to skip)")
    p.add_argument("--section", default="all", choices=["all", "seed-shapes", "cases", "model"],
                   help="seed-shapes: the systems' own shapes against one F.mse_loss (<device>-seed-shapes.md); "
                        "cases: the families' cases, every backend and phase; all (default): both; "
                        "model: predicted H200 times from the kernels' traffic and sm_90 code, measured on the "
                        "CPU (model-h200.md; not part of all)")
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
