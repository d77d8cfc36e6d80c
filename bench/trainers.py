"""Training step time of the seed systems' trainers with each loss backend, written to
bench/results/trainers-<device>.md.

    python bench/trainers.py                 # 300 steps each, every available backend
    python bench/trainers.py --steps 100 --device cuda

Every fused run also compares its loss with the reference every 10 steps (time excluded).
"""

import argparse
import sys
from pathlib import Path

import torch

from fusedloss import benchmark
from fusedloss.__main__ import command_line
from fusedloss.benchmark import trainers
from fusedloss.trainers.engine import resolve_device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = trainers.step_times(device, steps=args.steps, check_every=10)
    text = trainers.markdown(rows, benchmark.device_name(device), command_line())
    path = Path(args.out) / f"trainers-{benchmark.file_stem(device)}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
