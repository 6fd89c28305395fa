# Sourced by tests/run.sh and launch/quickstart.sh (from the repository root): creates the venv if
# missing, installs the pinned stack and this package (building the native kernel), activates it.
# The installs are skipped when nothing they depend on changed since the last successful one
# (stamp: $VENV/.gradpower-setup); set PYTHON to choose the interpreter (default python3, 3.11).
# VENV (default .venv) and REQUIREMENTS (default requirements-test.txt, the newest pins) choose
# the environment: tests/run.sh also builds .venv-oldest from requirements-test-oldest.txt.

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
    # torch first (the CPU wheel on this machine's disk), so nothing below pulls a CUDA build;
    # deepspeed builds against it, hence --no-build-isolation.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q --no-build-isolation -r "$REQUIREMENTS"
    # megatron-core's Muon (0.16 on) needs NVIDIA's emerging-optimizers, whose one release (0.3.0) declares
    # Python >= 3.12 but runs on 3.11 given typing.override, which the tests' shim backfills: installed without
    # that check, and without its dependencies (torch and absl-py, pinned above), where the pins hold that megatron-core
    if grep -qx "megatron-core==0.16.1" "$REQUIREMENTS"; then
        python -m pip install -q --no-deps --ignore-requires-python "emerging-optimizers==0.3.0"
    fi
    python -m pip install -q -e ".[jobs]"  # the library and the jobs wing's extra (tqdm, matplotlib, tensorboard)
    echo "$stamp" > "$VENV/.gradpower-setup"
fi
