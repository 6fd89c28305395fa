#!/usr/bin/env bash
# The one test command for a fresh machine (.ci/run runs it from a clean clone):
#   1. .venv with the newest pins (requirements-test.txt): the whole suite;
#   2. .venv-oldest with the oldest supported DeepSpeed and megatron-core
#      (requirements-test-oldest.txt): the integration tests of tests/oldest_env_tests.txt.
# Each environment is created if missing and installed only when its inputs changed
# (launch/setup_env.sh). Extra arguments go to pytest in one environment, the newest unless
# GRADPOWER_TEST_ENV=oldest, e.g. `bash tests/run.sh -k native -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PYTEST=(python -m pytest -q -p no:cacheprovider)

oldest_env() {
    VENV=.venv-oldest REQUIREMENTS=requirements-test-oldest.txt . launch/setup_env.sh
}

if [ $# -gt 0 ]; then
    if [ "${GRADPOWER_TEST_ENV:-newest}" = oldest ]; then oldest_env; else . launch/setup_env.sh; fi
    exec "${PYTEST[@]}" "$@"
fi

start=$SECONDS
# shellcheck source=launch/setup_env.sh
. launch/setup_env.sh
"${PYTEST[@]}"
newest=$((SECONDS - start))
deactivate
oldest_env
mapfile -t integration < <(grep -v '^#' tests/oldest_env_tests.txt)
"${PYTEST[@]}" "${integration[@]}"
echo "tests/run.sh: newest pins ${newest} s, oldest supported versions $((SECONDS - start - newest)) s"
