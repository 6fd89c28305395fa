#!/usr/bin/env bash
# The one test command for a fresh machine (.ci/run runs it from a clean clone):
#   1. .venv with the newest pins (requirements-test.txt, Python 3.11): the whole suite;
#   2. .venv-oldest with the oldest supported DeepSpeed and megatron-core
#      (requirements-test-oldest.txt): the integration tests of tests/oldest_env_tests.txt;
#   3. .venv-py312 with Python 3.12 and the newest megatron-core (requirements-test-py312.txt; megatron-core
#      0.17 on needs Python >= 3.12): the tests of tests/py312_env_tests.txt. Python 3.12 is looked for as
#      python3.12 on PATH, then in pyenv; without one this environment is skipped with a loud line, or, under
#      .ci/run (GRADPOWER_CI=1), the run fails saying what to install.
# Each environment is created if missing and installed only when its inputs changed
# (launch/setup_env.sh). Extra arguments go to pytest in one environment, the newest unless
# GRADPOWER_TEST_ENV=oldest or py312, e.g. `bash tests/run.sh -k native -x`.
# Either way it first installs, as root and with apt-get, what the multi-host tests (tests/multihost.py) need
# where it is missing: iproute2, openssh-server (sshd, ssh), pdsh. Not root (or no apt-get) it says what is
# missing and those tests skip, or, under .ci/run, fail.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PYTEST=(python -m pytest -q -p no:cacheprovider)

oldest_env() {
    VENV=.venv-oldest REQUIREMENTS=requirements-test-oldest.txt . launch/setup_env.sh
}

python312() {
    # the first Python 3.12 that runs: python3.12 on PATH (a pyenv shim there may name a version it does not
    # select), then pyenv's
    local found
    for found in "$(command -v python3.12 || true)" ~/.pyenv/versions/3.12*/bin/python3.12; do
        if [ -n "$found" ] && "$found" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$found"; return 0
        fi
    done
    return 1
}

py312_env() {
    # the machine's pip cap on torch (<= 2.14.1, where it has one) is lifted for this venv alone: it pins 2.15.0
    PYTHON=$1 VENV=.venv-py312 REQUIREMENTS=requirements-test-py312.txt PIP_CONSTRAINT=/dev/null . launch/setup_env.sh
}

multihost_packages() {  # apt-get install what tests/multihost.py needs and this machine lacks (as root)
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    { command -v ssh && command -v ssh-keygen; } >/dev/null || missing+=(openssh-client)
    command -v pdsh >/dev/null || missing+=(pdsh)
    [ ${#missing[@]} -gt 0 ] || return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "tests/run.sh: the multi-host tests need ${missing[*]}, which only root with apt-get installs here:" \
             "install them (apt-get install -y ${missing[*]}) or those tests skip (under .ci/run: fail)" >&2
        return 0
    fi
    echo "tests/run.sh: apt-get install ${missing[*]} (for the multi-host tests)"
    local log
    log=$(mktemp)
    export DEBIAN_FRONTEND=noninteractive
    # a fresh machine may have no package lists yet: update them only when the install fails
    local install=(timeout 300 apt-get install -y -qq "${missing[@]}")
    if ! { "${install[@]}" || { timeout 300 apt-get update -qq && "${install[@]}"; }; } >"$log" 2>&1; then
        tail -20 "$log" >&2
        echo "tests/run.sh: apt-get install ${missing[*]} failed (above): the multi-host tests skip (under" \
             ".ci/run: fail)" >&2
    fi
    rm -f "$log"
}

run_listed() {  # pytest over the test files listed in $1 (one per line, '#' comments)
    mapfile -t listed < <(grep -v '^#' "$1")
    "${PYTEST[@]}" "${listed[@]}"
}

multihost_packages
if [ $# -gt 0 ]; then
    case "${GRADPOWER_TEST_ENV:-newest}" in
        oldest) oldest_env ;;
        py312) py312_env "$(python312)" ;;
        *) . launch/setup_env.sh ;;
    esac
    exec "${PYTEST[@]}" "$@"
fi

start=$SECONDS
# shellcheck source=launch/setup_env.sh
. launch/setup_env.sh
"${PYTEST[@]}"
newest=$((SECONDS - start))
deactivate
oldest_env
run_listed tests/oldest_env_tests.txt
oldest=$((SECONDS - start - newest))
deactivate
if py=$(python312); then
    py312_env "$py"
    run_listed tests/py312_env_tests.txt
    py312="$((SECONDS - start - newest - oldest)) s"
elif [ "${GRADPOWER_CI:-0}" = 1 ]; then
    echo "tests/run.sh: error: no Python 3.12 (python3.12 on PATH or ~/.pyenv/versions/3.12.*), which the" \
         "megatron-core 0.17-0.19 environment needs: install one (e.g. pyenv install 3.12) and rerun" >&2
    exit 1
else
    echo "########################################################################################################"
    echo "tests/run.sh: SKIPPED the Python 3.12 environment (megatron-core 0.17-0.19): no python3.12 on PATH or in"
    echo "pyenv. Install Python 3.12 to test the current megatron-core releases."
    echo "########################################################################################################"
    py312="skipped (no Python 3.12)"
fi
echo "tests/run.sh: newest pins ${newest} s, oldest supported versions ${oldest} s, Python 3.12 / megatron-core" \
     "0.19 ${py312}"
