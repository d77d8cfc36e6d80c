"""Run the benchmark suite and write bench/results/<device>.{md,json}.

    python bench/run.py                      # every family, every backend, eager and compiled
    python bench/run.py --batches 64 --phases full

Same as `python -m fusedloss bench`; the harness and the cases live in fusedloss/benchmark/.
"""

import sys

from fusedloss.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
