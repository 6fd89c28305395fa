#!/usr/bin/env bash
# The one test command for a fresh machine: creates .venv (if missing), installs the
# pinned stack and this package (building the native kernel), then runs pytest.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k native -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/setup_env.sh
. launch/setup_env.sh

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec python -m pytest -q -p no:cacheprovider "$@"
