"""The cost of the losses' collectives next to the loss (issue 13): ``world`` ranks on one machine.

    python bench/distributed.py                     # 2 ranks over gloo on the CPU
    python bench/distributed.py --device cuda       # NCCL, one GPU per rank (--world <= GPUs)

Writes bench/results/distributed-<device>-W<world>.{md,json}; the cases: fusedloss/benchmark/distributed.py.
"""

import argparse
import sys
from pathlib import Path

from fusedloss.benchmark.distributed import launch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    launch(args.world, args.device, args.out, rounds=args.rounds, iterations=args.iterations,
           command="python bench/distributed.py " + " ".join(sys.argv[1:]))
