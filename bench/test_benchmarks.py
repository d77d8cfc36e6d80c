"""The benchmark cases through pytest-benchmark, for its statistics and saved comparisons:

    pytest bench/test_benchmarks.py --benchmark-enable --benchmark-autosave
    pytest-benchmark compare

bench/run.py (fusedloss.benchmark) is the reference measurement: CUDA-event timing, memory,
bandwidth and the side-by-side table. Here CUDA calls synchronise inside the timed function.
"""

import pytest
import torch

from fusedloss import benchmark as harness
from fusedloss.benchmark import blendshape, pva, score

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = (pva.cases(DEVICE, batches=(8, 64)) + blendshape.cases(DEVICE, batches=(16, 4096))
         + score.cases(DEVICE, batches=(256, 4096)))
BACKENDS = ["reference"] + harness.concrete_backends(DEVICE)


@pytest.mark.parametrize("phase", ["forward", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", ""))
def test_case(benchmark, case, backend, phase):
    fn = benchmark_fn = harness.phase_functions(case, backend, "eager", DEVICE, torch.float32)[phase]
    if DEVICE.type == "cuda":
        def benchmark_fn():
            fn()
            torch.cuda.synchronize()
    benchmark.group = f"{case.name} {phase}"
    benchmark(benchmark_fn)
