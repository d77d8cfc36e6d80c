"""The losses over the global batch of a process group (docs/losses.md §5), on 2 and 3 CPU
processes over gloo: every family, every backend that runs here, uneven and empty slices, against
the reference of the concatenated batch (tests/distributed_checks.py runs on each rank)."""

from __future__ import annotations

import distributed_checks
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def run_ranks(tmp_path, check: str, sizes: list[int], *args, device: str = "cpu") -> None:
    """``distributed_checks.<check>(sizes, *args)`` on len(sizes) processes; a failing rank's
    traceback fails the test."""
    mp.start_processes(distributed_checks.worker, args=(len(sizes), str(tmp_path / "rendezvous"), check,
                                                        (sizes, *args), device),
                       nprocs=len(sizes), start_method="spawn")


@pytest.mark.parametrize("sizes", [[3, 1], [2, 0, 3]], ids=["2 ranks", "3 ranks, one empty"])
def test_pva_over_group(tmp_path, sizes):
    run_ranks(tmp_path, "pva", sizes)


@pytest.mark.parametrize("sizes", [[3, 1], [2, 0, 3]], ids=["2 ranks", "3 ranks, one empty"])
def test_blendshape_over_group(tmp_path, sizes):
    run_ranks(tmp_path, "blendshape", sizes)


@pytest.mark.parametrize("sizes, classes", [
    ([3, 2], ["real", "fake"]),
    ([2, 0, 4], ["real", "mixed", "mixed"]),
    ([3, 1, 2], ["fake", "fake", "fake"]),
], ids=["one rank real, one fake", "3 ranks, one empty", "no real score"])
def test_score_over_group(tmp_path, sizes, classes):
    run_ranks(tmp_path, "score", sizes, classes)


def test_ddp_averaged_gradients_are_the_single_process_gradients(tmp_path):
    run_ranks(tmp_path, "ddp", [5, 2])


def test_row_counts_go_over_a_gloo_twin_of_a_group_without_cpu_backend(tmp_path):
    run_ranks(tmp_path, "host group", [2, 0, 1])


def test_compiled_over_group_matches_eager(tmp_path):
    run_ranks(tmp_path, "compile", [3, 2])


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
@pytest.mark.parametrize("check, args", [("pva", ()), ("blendshape", ()), ("score", (["mixed"],)), ("compile", ())])
def test_cuda_backends_over_an_nccl_group(tmp_path, check, args):
    """One rank per GPU (NCCL refuses two ranks on one GPU): with a single GPU this checks the
    CUDA and Triton backends' code paths over a group of one, and the gloo twin of the row counts."""
    world = min(torch.cuda.device_count(), 2)
    sizes = [3, 2][:world]
    run_ranks(tmp_path, check, sizes, *[a[:1] * world for a in args], device="cuda")


def test_process_group_is_checked():
    with pytest.raises(TypeError, match="process_group"):
        import fusedloss
        fusedloss.PVALoss(process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        fusedloss.functional.combined_loss(torch.zeros(2), torch.zeros(2, 2), torch.zeros(2), process_group=1)
