#!/usr/bin/env bash
# Installs fusedloss if needed, then runs the main job: every backend checked against the
# reference, and the speed table of this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m fusedloss demo "$@"
