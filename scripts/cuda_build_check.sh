#!/usr/bin/env bash
# The heavy build check: where most users are, a CUDA build of torch on a machine without a GPU.
# Too heavy for every CI run (about 5 GB of packages; about an hour on 2 cores, most of it nvcc
# compiling the kernels for every architecture torch was built for, three times over, and the test
# suite). Run it before resolving anything that touches the build, and whenever the build files
# change: setup.py, CMakeLists.txt, pyproject.toml, fusedloss/core/build.py,
# fusedloss/core/extension.py, scripts/install.sh, or the layout of csrc/.
#
#   bash scripts/cuda_build_check.sh                       # everything below
#   bash scripts/cuda_build_check.sh -m "not simt" -x      # pytest arguments for the suite
#   FUSEDLOSS_CUDA_VENV=/path/to/venv bash scripts/cuda_build_check.sh
#   FUSEDLOSS_BUILD_CHECK_WORK=/tmp/check bash scripts/cuda_build_check.sh   # keep the builds there
#
# 1. A scratch venv (FUSEDLOSS_CUDA_VENV, default ~/.cache/fusedloss/venv-torch-$TORCH-cuda; made
#    once, reused) with the registry's CUDA build of torch==$TORCH (the torch install.sh installs
#    on a machine without one) and the Triton that torch pins, plus the newest releases of the
#    project's other dependencies and of its test, train and lightning extras (pip's own
#    configuration is ignored: PIP_CONFIG_FILE=/dev/null, PIP_FIND_LINKS unset, so a local
#    CPU wheel or constraint file does not replace the registry's CUDA build).
# 2. scripts/build_check.py in that venv, with no TORCH_CUDA_ARCH_LIST and no CUDA_HOME (unless
#    set here): setup.py editable and as a wheel, the wheel's build on first use, and CMake, each
#    checked to register the CPU, CUDA and Meta kernels of every operator.
# 3. The whole test suite in the editable build (pytest arguments: this script's arguments). With
#    no GPU, every test passes but those that need one, which skip. It runs the Triton interpreter
#    tests and the sm_90 compile of every Triton kernel (tests/triton_sm90_compile.py) with the
#    Triton this torch pins; CI runs them with the Triton install.sh pins.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0}
VENV=${FUSEDLOSS_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fusedloss/venv-torch-$TORCH-cuda}
PY="$VENV/bin/python"

pip_registry() {  # pip against the registry alone, the newest releases that fit
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip "$@"
}

if [ ! -x "$PY" ]; then
  echo "cuda_build_check: making the venv $VENV" >&2
  python3 -m venv "$VENV"
fi
# The project's dependencies and extras from pyproject.toml, but torch (pinned here) and triton
# (the release torch pins).
mapfile -t DEPS < <("$PY" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
names = project["dependencies"] + [d for extra in ("test", "train", "lightning")
                                   for d in project["optional-dependencies"][extra]]
for d in dict.fromkeys(names):
    if re.match(r"(torch|triton)\b", d) is None:
        print(d)
PY
)
pip_registry install --quiet --upgrade pip setuptools wheel
pip_registry install --quiet --upgrade "torch==$TORCH" "${DEPS[@]}"
# The published TIGAS package, without its dependencies (as install.sh does).
pip_registry install --quiet --no-deps "tigas-metric==0.2.1" \
  || echo "cuda_build_check: tigas-metric==0.2.1 is not available; its tests will be skipped" >&2
"$PY" - <<'PY'
import importlib.metadata as md, re, torch, triton
pin = [r for r in md.requires("torch") or [] if re.match(r"triton\b", r)]
print(f"cuda_build_check: torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: "
      f"{torch.cuda.is_available()}), triton {triton.__version__} (torch requires {', '.join(pin) or 'none'}), "
      + ", ".join(f"{p} {md.version(p)}" for p in ("pytest", "pytest-benchmark", "hypothesis")))
assert torch.version.cuda is not None, "the registry gave a CPU build of torch"
PY
exec "$PY" scripts/build_check.py --tests ${FUSEDLOSS_BUILD_CHECK_WORK:+--work "$FUSEDLOSS_BUILD_CHECK_WORK"} \
  -- -p no:cacheprovider "$@"
