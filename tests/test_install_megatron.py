"""megatron-core 0.17.1 and 0.18.2, the releases between the newest tested in full (0.19.2) and 0.16: installed as a
cluster image has them, kept by ``pip install <repo>[megatron]``, and running the core Megatron tests.

One slow test (Python 3.12, which megatron-core 0.17 on needs; tests/run.sh runs it in .venv-py312) builds one
fresh virtual environment with this environment's torch and, in turn, each release with emerging-optimizers (its
Muon), then runs what a user runs, ``pip install <repo>[megatron]``, checks that pip kept that megatron-core and
torch, and runs tests/test_megatron_optimizer.py (apply/remove, the configs, AdamPower on 2 gloo ranks with and
without the distributed optimizer against a float64 reference, offload) and tests/test_megatron_muon.py (MuonPower
against its reference, p = 1 bit for bit Megatron's Muon) there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RELEASES = ("0.17.1", "0.18.2")
CORE_TESTS = ("tests/test_megatron_optimizer.py", "tests/test_megatron_muon.py")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.version_info < (3, 12), reason="megatron-core 0.17 on needs Python >= 3.12")]

VERSIONS = ("import importlib.metadata as m, json; "  # local build tags (+cu132) left out
            "print(json.dumps({d: m.version(d).split('+')[0] for d in ('torch', 'megatron-core')}))")


def run(*cmd, timeout=900, cwd=None, env=None) -> str:
    """Runs `cmd`; fails the test with its output when it exits non-zero; returns stdout."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout


def test_megatron_core_0_17_and_0_18(tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_CONSTRAINT": "/dev/null"}  # this environment's torch may be above a machine's cap
    torch_version = torch.__version__.split("+")[0]
    run(*pip, f"torch=={torch_version}", "pytest", "numpy", "packaging", env=env)
    for release in RELEASES:
        run(*pip, f"megatron-core=={release}", "emerging-optimizers==0.3.0", env=env)
        stack = {"torch": torch_version, "megatron-core": release}
        assert json.loads(run(python, "-c", VERSIONS)) == stack
        log = run(*pip[:-1], f"{ROOT}[megatron]", env=env)  # not quiet: what pip did is the evidence if this fails
        after = json.loads(run(python, "-c", VERSIONS))
        assert after == stack, f"pip replaced the installed stack: {stack} -> {after}\n{log[-3000:]}"
        out = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS, cwd=ROOT,
                  env={**os.environ, "TORCH_EXTENSIONS_DIR": str(venv / "torch_extensions")}, timeout=1200)
        assert " passed" in out.splitlines()[-1] and "failed" not in out.splitlines()[-1], out[-3000:]
