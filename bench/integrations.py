"""The loss in the seed systems' own call forms, timed in their setting (fusedloss/benchmark/integrations.py).

    python bench/integrations.py                 # CPU
    python bench/integrations.py --device cuda
"""

import argparse
import sys
from pathlib import Path

import torch

from fusedloss.benchmark import integrations

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = integrations.run(device, rounds=args.rounds)
    print(integrations.write(rows, device, Path(args.out), "python bench/integrations.py " + " ".join(sys.argv[1:])))
