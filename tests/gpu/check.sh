#!/usr/bin/env bash
# The one prepared GPU check, run from the repository root on a machine with a CUDA GPU:
#   bash tests/gpu/check.sh            (about 8 minutes; the report goes to $OUT, default runs/gpu_check)
# (a GPU machine without the package index: gather .whl/ first where there is one, with
# bash tests/gpu/fetch_wheels.sh, and copy it along). Writes $OUT/gpu_report.json and
# $OUT/gpu_check.log; see tests/gpu/check.py for the steps. Without a GPU (or with --dry-run) it is
# the CI dry run: every step in its CPU form (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
exec "$PYTHON" tests/gpu/check.py "$@"
