"""The H200 model against a GPU: the model's cases timed for real, next to the predictions.

    python -m fusedloss.benchmark.calibrate                   # on a GPU (scripts/gpu_check.sh runs it)
    python -m fusedloss.benchmark.calibrate --device cpu      # the dry run: the CPU variants only

For every case of bench/results/model-h200.json (``--model``) and every variant the model
predicts (fused cuda, fused triton, the eager reference, one F.mse_loss), one forward + backward
(torch.autograd.grad w.r.t. the predictions) is timed with CUDA events (triton.testing.do_bench,
median) and its device activities counted with the profiler, per phase. With ``--ncu`` and Nsight
Compute on the PATH, one more pass runs each fused step once under ``ncu`` and reads, per fusedloss
kernel launch of the large cases, the DRAM bytes and the global sectors per request, next to the
model's. Writes <out>/model-calibration-<gpu>.md and .json (first with the timings, then again with
ncu's figures): measured, predicted, and their ratio.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from . import device_name, file_stem, model

ROOT = Path(__file__).resolve().parents[2]
NCU_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum",
               "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
               "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum")
OUR_KERNELS = r"regex:(pva|blendshape|score)_(forward|backward|keys)_kernel"


def variants(case: model.Case, device: torch.device) -> dict:
    """{variant: (forward(), step())} as the model names them, for those that run here."""
    from .. import backends

    out = {}
    leaves, run, mse = case.make(case.B, device)
    for backend in ("cuda", "triton"):
        if device.type == "cuda" and backends.unavailable_reason(backend, "cuda") is None:
            out[f"fused {backend}"] = (lambda b=backend: run(b))
    out["reference eager"] = lambda: run("reference")
    out["mse_loss"] = mse
    return {name: (fn, lambda fn=fn, wrt=leaves[:1] if name == "mse_loss" else leaves: torch.autograd.grad(fn(), wrt))
            for name, fn in out.items()}


def time_us(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    from torch.utils.benchmark import Timer

    fn()
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.1).median * 1e6


def launches(forward, step, device: torch.device) -> dict | None:
    """Device activities of one forward and of one backward (the profiler; GPU only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    def count(fn):
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)

    both, fwd = count(step), count(forward)
    return {"forward": fwd, "backward": both - fwd}


def ncu_pass(names: list[str]) -> None:
    """Each fused step once (the target of ``ncu``)."""
    device = torch.device("cuda")
    for case in model.cases(tuple(names)):
        for name, (_, step) in variants(case, device).items():
            if name.startswith("fused"):
                print(f"STEP {case.name} | {name}", file=sys.stderr, flush=True)
                step()
                torch.cuda.synchronize()


def run_ncu(names: list[str], log) -> list[dict]:
    """Per fusedloss kernel launch, in launch order: its name and the ncu metrics."""
    ncu = shutil.which("ncu")
    if ncu is None:
        log("ncu not found: no hardware counters")
        return []
    cmd = [ncu, "--clock-control", "none", "--csv", "--kernel-name", OUR_KERNELS, "--metrics", ",".join(NCU_METRICS),
           sys.executable, "-m", "fusedloss.benchmark.calibrate", "--ncu-pass",
           *[a for n in names for a in ("--case", n)]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if result.returncode != 0:
        log(f"ncu failed ({result.returncode}): {result.stderr[-2000:]}")
        return []
    text = result.stdout[result.stdout.find('"ID"'):]
    rows: dict = {}
    for r in csv.DictReader(io.StringIO(text)):
        entry = rows.setdefault(r["ID"], {"kernel": r["Kernel Name"]})
        value = r["Metric Value"].replace(",", "")
        unit = r.get("Metric Unit", "")
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1)
        try:
            entry[r["Metric Name"]] = float(value) * scale
        except ValueError:
            pass
    return [rows[k] for k in sorted(rows, key=int)]


def match_launches(expected: list[tuple], measured: list[dict]) -> list[tuple]:
    """Pairs (case, variant, launch) of the model with ncu's rows, in launch order and by kernel
    name: a row naming another kernel is skipped, a launch with no row left gets None."""
    out, j = [], 0
    for e in expected:
        name = e[2]["name"].split("<")[0]
        k = next((k for k in range(j, len(measured)) if name in measured[k]["kernel"]), None)
        out.append((e, None if k is None else measured[k]))
        if k is not None:
            j = k + 1
    return out


def calibrate(model_json: Path, device: torch.device, names: list[str] | None, use_ncu: bool, log=print,
              written=lambda result: None) -> dict:
    """Time every case; ``written(result)`` is called with the timings before the (slower) ncu pass."""
    predicted = json.loads(model_json.read_text())
    by_key = {(p["case"], p["variant"]): p for p in predicted["predictions"]}
    case_names = names or list(dict.fromkeys(p["case"] for p in predicted["predictions"]))
    rows = []
    for case in model.cases(tuple(case_names)):
        for name, (forward, step) in variants(case, device).items():
            p = by_key.get((case.name, name))
            if p and p.get("note"):
                continue  # the model says it does not fit on the GPU
            try:
                us = time_us(step, device)
                counted = launches(forward, step, device)
            except torch.OutOfMemoryError:
                log(f"  {case.name} {name}: out of memory")
                continue
            row = {"case": case.name, "variant": name, "measured_us": us, "launches": counted,
                   "predicted_us": 1e6 * p["total_s"] if p else None,
                   "predicted_launches": p["launches"] if p else None}
            rows.append(row)
            log(f"  {case.name:34s} {name:16s} {us:10.1f} us measured, "
                f"{row['predicted_us'] or float('nan'):10.1f} us predicted")
    kernels = []
    result = {"device": device_name(device), "torch": torch.__version__, "model": str(model_json), "rows": rows,
              "kernels": kernels}
    written(result)
    if use_ncu and device.type == "cuda":
        # The large cases only: at the seed shapes a launch is latency, not traffic.
        large = [c.name for c in model.cases(tuple(case_names)) if not c.seed]
        measured = run_ncu(large, log)
        expected = [(p["case"], p["variant"], la) for p in predicted["predictions"] if p["case"] in large
                    and p["variant"].startswith("fused") for la in p["detail"] if la["kind"] == "kernel"]
        for (case, variant, la), m in match_launches(expected, measured):
            if m is None:
                log(f"  ncu: no launch of {la['name']} ({case}, {variant}) where the model has one")
                continue
            ld_req = m.get("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", 0)
            st_req = m.get("l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", 0)
            sectors = m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", 0) + \
                m.get("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum", 0)
            kernels.append({"case": case, "variant": variant, "kernel": la["name"], "ncu_kernel": m["kernel"],
                            "predicted_dram_bytes": la["bytes"],
                            "measured_dram_bytes": m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0),
                            "predicted_sectors_per_request": la["traffic"]["sectors_per_request"],
                            "measured_sectors_per_request": sectors / max(ld_req + st_req, 1)})
        written(result)
    return result


def markdown(result: dict, command: str) -> str:
    lines = [f"# The H200 model against {result['device']}", "",
             f"- predictions: {result['model']} (fusedloss/benchmark/model.py); measured: one forward + backward, "
             "median (on a GPU: CUDA events through triton.testing.do_bench; the CPU dry run: "
             "torch.utils.benchmark); launches: the profiler's device activities per phase (GPU only)", f"- command: `{command}`", "",
             "| case | variant | measured us | predicted us | measured / predicted | launches fwd/bwd measured | "
             "predicted |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        pred = r["predicted_us"]
        ratio = f"{r['measured_us'] / pred:.2f}" if pred else "-"
        got = f"{r['launches']['forward']}/{r['launches']['backward']}" if r["launches"] else "-"
        want = f"{r['predicted_launches']['forward']}/{r['predicted_launches']['backward']}" \
            if r["predicted_launches"] else "-"
        lines.append(f"| {r['case']} | {r['variant']} | {r['measured_us']:.1f} | "
                     f"{'-' if pred is None else f'{pred:.1f}'} | {ratio} | {got} | {want} |")
    if result["kernels"]:
        lines += ["", "## Per kernel launch (ncu)", "",
                  "| case | variant | kernel | DRAM bytes measured | predicted | sectors/request measured "
                  "| predicted |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for k in result["kernels"]:
            lines.append(f"| {k['case']} | {k['variant']} | {k['kernel']} | {k['measured_dram_bytes']:.0f} | "
                         f"{k['predicted_dram_bytes']:.0f} | {k['measured_sectors_per_request']:.2f} | "
                         f"{k['predicted_sectors_per_request']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=str(ROOT / "bench" / "results" / "model-h200.json"))
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--ncu", action="store_true", help="also read DRAM bytes and sectors per request with ncu")
    parser.add_argument("--ncu-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ncu_pass:
        ncu_pass(args.case or [])
        return 0
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"model-calibration-{file_stem(device)}"
    command = " ".join(["python -m fusedloss.benchmark.calibrate", *(argv if argv is not None else sys.argv[1:])])

    def write(result):  # after the timings, and again with ncu's figures
        stem.with_suffix(".md").write_text(markdown(result, command))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", flush=True)

    calibrate(Path(args.model), device, args.case, args.ncu, written=write)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
