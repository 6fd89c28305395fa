"""Installing gradpower-ds never replaces the user's stack (declared ranges, not pins; DeepSpeed an extra), and the
library needs none of the jobs wing's extra.

One slow test builds a fresh virtual environment as a cluster image might have it — torch
2.13.0 and DeepSpeed 0.17.6, an older DeepSpeed than our test pins — then runs what a user
runs, ``pip install <repo>[deepspeed]`` (an ordinary, isolated build of the wheel, without the
``jobs`` extra), and checks that pip kept DeepSpeed and torch as they were, that it installed
neither matplotlib nor tensorboard, that an optimizer step and ``register()`` work there, and
that the main job says which extra to install.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER_STACK = {"torch": "2.13.0", "deepspeed": "0.17.6"}

pytestmark = pytest.mark.slow

VERSIONS = ("import importlib.metadata as m, json; "  # local build tags (+cpu) left out
            "print(json.dumps({d: m.version(d).split('+')[0] for d in ('torch', 'deepspeed')}))")


def run(*cmd, timeout=900, cwd=None) -> str:
    """Runs `cmd`; fails the test with its output when it exits non-zero; returns stdout."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc.stdout


def test_install_keeps_an_older_deepspeed_and_torch(tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(*pip, f"torch=={USER_STACK['torch']}")
    # DeepSpeed builds from its sdist against the installed torch (as in requirements-test*.txt)
    run(*pip, "--no-build-isolation", "setuptools", "wheel", f"deepspeed=={USER_STACK['deepspeed']}")
    before = json.loads(run(python, "-c", VERSIONS))
    assert before == USER_STACK, before

    log = run(*pip[:-1], f"{ROOT}[deepspeed]")  # not quiet: what pip did is the evidence if this fails
    after = json.loads(run(python, "-c", VERSIONS))
    assert after == before, f"pip replaced the installed stack: {before} -> {after}\n{log[-3000:]}"

    check = ("import importlib.util, torch, gradpower_ds, gradpower_ds.deepspeed as gds; "
             "assert gradpower_ds.__file__.startswith(%r), gradpower_ds.__file__; "
             "assert [m for m in ('matplotlib', 'tensorboard') if importlib.util.find_spec(m)] == []; "
             "p = torch.nn.Parameter(torch.ones(4)); opt = gradpower_ds.CPUAdamPower([p], lr=0.1); "
             "p.grad = torch.full((4,), 0.5); opt.step(); assert torch.all(p < 1); "
             "gds.register(); assert gds.is_registered(); "
             "from deepspeed.runtime import config; assert 'adampower' in config.DEEPSPEED_OPTIMIZERS; "
             "print(gds.DEEPSPEED.installed())") % str(venv)
    # (away from the checkout, so the installed package is the one imported)
    assert run(python, "-c", check, timeout=300, cwd=tmp_path).strip().endswith(USER_STACK["deepspeed"])
    job = subprocess.run([str(python), "-m", "gradpower_ds", "train"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert job.returncode != 0 and "needs the jobs extra, which is not installed here (missing: matplotlib, " \
        "tensorboard): pip install \"gradpower-ds[jobs]\"" in job.stderr, job.stderr[-2000:]
