# Sourced by tests/run.sh and launch/quickstart.sh (from the repository root): creates the venv if
# missing, installs the pinned stack and this package (building the native kernel), activates it.
# The installs are skipped when nothing they depend on changed since the last successful one
# (stamp: $VENV/.gradpower-setup); set PYTHON to choose the interpreter (default python3, 3.11).
# VENV (default .venv) and REQUIREMENTS (default requirements-test.txt, the newest pins) choose
# the environment: tests/run.sh also builds .venv-oldest from requirements-test-oldest.txt and, with
# Python 3.12, .venv-py312 from requirements-test-py312.txt.

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
REQUIREMENTS=${REQUIREMENTS:-requirements-test.txt}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# DeepSpeed JIT-builds its ops (CPU all-reduce, Adam) on first use: one cache per venv, so venvs
# and ninja versions do not keep rebuilding each other's (see launch/README.md).
export TORCH_EXTENSIONS_DIR=$PWD/$VENV/torch_extensions

stamp=$(cat "$REQUIREMENTS" launch/setup_env.sh setup.py gradpower_ds/jobs/__init__.py gradpower_ds/ops/builder.py \
        gradpower_ds/csrc/* | sha256sum \
        | cut -d' ' -f1)
if [ "$(cat "$VENV/.gradpower-setup" 2>/dev/null)" != "$stamp" ]; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    python -m pip install -q --upgrade pip setuptools wheel
    # torch first, as the requirements pin it (on Python 3.11 the CPU wheel on this machine's disk), so nothing
    # below pulls another build; deepspeed builds against it, hence --no-build-isolation.
    python -m pip install -q "$(grep -m1 -E '^torch==' "$REQUIREMENTS")"
    python -m pip install -q --no-build-isolation -r "$REQUIREMENTS"
    # megatron-core's Muon (0.16 on) needs NVIDIA's emerging-optimizers, whose one release (0.3.0) declares
    # Python >= 3.12 but runs on 3.11 given typing.override, which the tests' shim backfills: on 3.11 installed
    # without that check, and without its dependencies (torch and absl-py, pinned above), where the pins hold
    # megatron-core 0.16.1 (requirements-test-py312.txt pins it as an ordinary requirement)
    if grep -qx "megatron-core==0.16.1" "$REQUIREMENTS"; then
        python -m pip install -q --no-deps --ignore-requires-python "emerging-optimizers==0.3.0"
    fi
    python -m pip install -q -e ".[jobs]"  # the library and the jobs wing's extra (tqdm, matplotlib, tensorboard)
    echo "$stamp" > "$VENV/.gradpower-setup"
fi
