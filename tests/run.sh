#!/usr/bin/env bash
# The one test command for a fresh machine: creates .venv (if missing), installs the
# pinned stack and this package (building the native kernel), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k native -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip setuptools wheel
# torch first (the CPU wheel on this machine's disk), so nothing below pulls a CUDA build;
# deepspeed builds against it, hence --no-build-isolation.
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-build-isolation -r requirements.txt
python -m pip install -q -e .

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec python -m pytest -q -p no:cacheprovider "$@"
