#!/usr/bin/env bash
# Installs fusedloss from this checkout (editable, C++/CUDA extension built against the installed
# torch) with its test dependencies and the train and lightning extras, into the current python3.
# Never replaces an installed torch: only a machine without one gets the CPU build of torch 2.13.0
# (and the Triton tested with it); an installed torch older than the supported 2.13 stops it.
# Does nothing when this checkout is already installed with its extension built.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

installed() {
  (cd / && "$PY" - "$PWD" <<'PY'
import os, sys
import fusedloss, fusedloss._C, pytest, pytest_benchmark, hypothesis, tqdm, matplotlib, lightning  # noqa: F401
sys.exit(0 if os.path.samefile(os.path.dirname(fusedloss.__file__), os.path.join(sys.argv[1], "fusedloss")) else 1)
PY
  ) >/dev/null 2>&1
}

if ! installed; then
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install: no torch here; installing the CPU build torch==2.13.0 with triton==3.8.0" >&2
    "$PY" -m pip install --quiet "torch==2.13.0" "triton==3.8.0"
  fi
  # pyproject.toml's floor: pip would otherwise replace an older torch.
  if ! "$PY" -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 13))"; then
    echo "install: torch $("$PY" -c 'import torch; print(torch.__version__)') is older than the supported 2.13;" \
         "upgrade it first (e.g. pip install 'torch>=2.13')" >&2
    exit 1
  fi
  echo "install: building fusedloss against torch $("$PY" -c 'import torch; print(torch.__version__)') (about a minute)" >&2
  # With every dependency already present (e.g. an offline GPU machine) pip needs no index;
  # if it still cannot resolve them, install the package alone.
  "$PY" -m pip install --quiet --no-build-isolation -e ".[test,train,lightning]" \
    || "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
fi
# The published TIGAS package, for the tests of fusedloss.integrations.tigas: without its
# dependencies (torchvision, OpenCV, scikit-learn, ...), which its training code does not use.
# It comes last: pip checks the requirements of installed packages that share a dependency with
# what it installs, and would report tigas-metric's missing torchvision at every install above.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tigas') is None)" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps "tigas-metric==0.2.1" \
    || echo "install: tigas-metric==0.2.1 is not available; its tests will be skipped" >&2
fi
