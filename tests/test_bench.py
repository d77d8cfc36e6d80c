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
    assert "reference" in backends and len(results) == 2 * len(backends)
    assert bandwidth > 0 and all(r.median_ms > 0 and r.gbps > 0 for r in results)
    fused = [r for r in results if r.backend != "reference"]
    assert all(r.vs_eager_reference is not None for r in fused)
    path = benchmark.write(results, device, bandwidth, torch.float32, tmp_path, "test")
    table = path.read_text()
    assert "| pva [2, 80, 265] | reference | eager | forward |" in table
    payload = json.loads(path.with_suffix(".json").read_text())
    assert len(payload["results"]) == len(results) and payload["copy_bandwidth_gbps"] > 0
    assert "pva [2, 80, 265]" in benchmark.summary(results)
