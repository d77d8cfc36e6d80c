"""The benchmark harness runs and writes its table (a smoke test: no timing is asserted)."""

import json

import torch

from fusedloss import benchmark
from fusedloss.benchmark import pva


def test_harness_writes_markdown_and_json(tmp_path):
    device = torch.device("cpu")
    results, bandwidth = benchmark.run_cases(
        pva.cases(device, batches=(2,)), device, modes=("eager",), phases=("forward", "full"),
        min_run_time=0.01, copy_mib=8, log=lambda line: None,
    )
    backends = {r.backend for r in results}
    counts = benchmark.thread_counts(device)  # 1 and all the CPU's threads, side by side
    assert "reference" in backends and len(results) == 2 * len(backends) * len(counts)
    assert {r.threads for r in results} == set(counts)
    assert bandwidth > 0 and all(r.median_ms > 0 and r.gbps > 0 for r in results)
    # Bandwidth against a copy of the same bytes in the same run; the fresh gradient's page faults apart.
    assert all(r.copy_ms > 0 and r.copy_fraction > 0 and r.alloc_ms >= 0 for r in results)  # (glibc)
    assert all(r.alloc_ms == 0 for r in results if r.phase == "forward")
    fused = [r for r in results if r.backend != "reference"]
    assert all(r.vs_eager_reference is not None for r in fused)
    path = benchmark.write(results, device, bandwidth, torch.float32, tmp_path, "test")
    table = path.read_text()
    assert "| pva [2, 80, 265] | reference | eager | forward |" in table
    assert path.name == benchmark.file_stem(device, counts) + ".md"
    assert all(f"ms {c}T" in table for c in counts) and "% copy" in table and "alloc ms" in table
    payload = json.loads(path.with_suffix(".json").read_text())
    assert len(payload["results"]) == len(results) and payload["copy_bandwidth_gbps"] > 0
    assert "pva [2, 80, 265]" in benchmark.summary(results)


def test_bench_command_writes_its_files_after_every_case(tmp_path, monkeypatch):
    """A run cut short (the GPU check's time limit) keeps the cases it measured."""
    from fusedloss.__main__ import main

    seen = []
    real_write = benchmark.write

    def write(results, *args, **kwargs):
        seen.append(sorted({r.case for r in results}))
        return real_write(results, *args, **kwargs)

    monkeypatch.setattr(benchmark, "write", write)
    assert main(["bench", "--device", "cpu", "--family", "pva,score", "--batches", "pva:2,score:16",
                 "--modes", "eager", "--phases", "forward", "--section", "cases", "--out", str(tmp_path)]) == 0
    assert seen == [["pva [2, 80, 265]"], ["pva [2, 80, 265]", "score B=16"]]
    cpu = torch.device("cpu")
    assert "score B=16" in (tmp_path / (benchmark.file_stem(cpu, benchmark.thread_counts(cpu)) + ".md")).read_text()


def test_seed_shapes_table(tmp_path):
    """The seed-shapes section: every variant of a case timed, its ratio to one F.mse_loss, files."""
    from fusedloss.benchmark import seed_shapes

    device = torch.device("cpu")
    rows = seed_shapes.run(device, rounds=1, min_run_time=0.01, cases=seed_shapes.CASES[1:3], log=lambda line: None)
    variants = {(r.case, r.variant) for r in rows}
    for case in ("blendshape [4, 52]", "score B=64"):
        for variant in ("fused cpu", "mse_loss", "reference eager", "reference compile"):
            assert (case, variant) in variants
    assert all(r.median_us > 0 for r in rows)
    assert all(r.vs_mse_loss == 1.0 for r in rows if r.variant == "mse_loss")
    path = seed_shapes.write(rows, device, tmp_path, "test")
    assert "| blendshape [4, 52] | fused cpu |" in path.read_text()
    assert len(json.loads(path.with_suffix(".json").read_text())["rows"]) == len(rows)


def test_distributed_benchmark_writes_its_table(tmp_path):
    """bench/distributed.py on 2 gloo processes, one round of two calls per variant."""
    from fusedloss.benchmark import distributed

    distributed.launch(2, "cpu", str(tmp_path), rounds=1, iterations=2, command="test")
    (table,) = tmp_path.glob("distributed-*-W2.md")
    text = table.read_text()
    assert "| score B=64 | cpu |" in text and "| pva [64, 80, 265] last-frame | cpu |" in text
    rows = json.loads(table.with_suffix(".json").read_text())["rows"]
    assert all(r["local_us"] > 0 and r["over group_us"] > 0 and r["collectives_us"] > 0 for r in rows)


def test_integrations_benchmark_writes_its_table(tmp_path):
    from fusedloss.benchmark import integrations

    device = torch.device("cpu")
    rows = integrations.run(device, rounds=1, min_run_time=0.01, log=lambda line: None)
    assert {"ours pairs='all' cpu", "ours pairs='sampled' cpu"} <= {r["variant"] for r in rows}
    assert all(r["median_us"] > 0 for r in rows)
    path = integrations.write(rows, device, tmp_path, "test")
    assert "| TIGAS B=32 | ours pairs='all' cpu |" in path.read_text()
