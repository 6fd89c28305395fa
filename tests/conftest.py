"""Shared test helpers: edge-value tensors, deterministic gradient streams, multi-process launches."""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradpower_ds.jobs.processes import free_port  # noqa: F401  (tests import it from here)
from gradpower_ds.jobs.run_dir import read_json
from multihost import Cluster, Unavailable

FP32_EDGES = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
              float("inf"), float("-inf"), float("nan"), 1e-3, -2.5, 123456.0, 0.5, 2.0]


def edge_tensor(dtype=torch.float32) -> torch.Tensor:
    """Zeros, subnormals, the normal/subnormal boundary, huge values, +-Inf and NaN, plus ordinary values."""
    return torch.tensor(FP32_EDGES, dtype=torch.float32).to(dtype)


def grad_stream(shape, steps, seed=0, scale=1e-2):
    """A reproducible list of gradients with a realistic spread of magnitudes (incl. exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen) * scale * torch.exp(torch.randn(shape, generator=gen))
        if g.numel():
            g.view(-1)[:: max(1, g.numel() // 7)] = 0.0
        grads.append(g)
    return grads


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


DEEPSPEED_SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def _private_kernel_verdicts(tmp_path_factory):
    """The Triton kernel's per-GPU verdicts (gradpower_ds.kernel_gate) go to the session's temporary directory, for
    the tests and every job they launch: the suite never reads or writes the user's ~/.cache, and on a GPU each
    session checks the kernel afresh."""
    saved = os.environ.get("GRADPOWER_CACHE_DIR")
    os.environ["GRADPOWER_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel_verdicts"))
    yield
    if saved is None:
        os.environ.pop("GRADPOWER_CACHE_DIR", None)
    else:
        os.environ["GRADPOWER_CACHE_DIR"] = saved


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed 0.19.8's CPU all-reduce can leave its shared-memory buffers (66 MB per rank) in /dev/shm after a
    job (a clean 2-rank job here left none; a full CI run beside other test runs left 48, 3.1 GB), where they
    hold the machine's memory until removed: the session removes the ones that appeared while it ran."""
    before = set(glob.glob(DEEPSPEED_SHM_BUFFERS))
    yield
    for path in set(glob.glob(DEEPSPEED_SHM_BUFFERS)) - before:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# DeepSpeed JIT-builds ops on first use (the CPU shm all-reduce at init, FusedAdam for "AdamW"), ~40 s each on
# 2 cores, cached in ~/.cache/torch_extensions. That cache is shared by every venv on the machine (sources at
# other paths: a rebuild), and ninja 1.13 (pip, in the venv) and 1.11 (system) hash commands differently (a
# rebuild whenever the other one ran last). So: one cache per venv, and the venv's bin (ninja, deepspeed) first
# on PATH for every launch.
JIT_ENV = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def wait_for_running_step(run_dir, proc, step: int, deadline: float) -> dict | None:
    """Polls run_dir/status.json (every 5 ms) until it says running at `step` or later; returns the last status
    read (None: none) when that happens, when `proc` exits or when time.time() passes `deadline`."""
    status = None
    while time.time() < deadline and proc.poll() is None:
        status = read_json(Path(run_dir) / "status.json")
        if status and status["state"] == "running" and status["step"] >= step:
            break
        time.sleep(0.005)
    return status


def launch_env(**extra) -> dict:
    """The environment for a launched job: one OpenMP thread per rank, JIT_ENV, then `extra`."""
    return dict(os.environ, OMP_NUM_THREADS="1", **JIT_ENV, **extra)


def run_launched(cmd: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Runs a launched job (its own process group, output captured) for at most `timeout` seconds, or
    $GRADPOWER_TEST_LAUNCH_TIMEOUT where that is shorter (the GPU check sets it, so a stuck launch fails its
    test with the job's output instead of silently using up the check's budget). On timeout the whole group
    (launcher and ranks) is killed and the test fails with the tail of what the job printed."""
    limit = min(timeout, float(os.environ.get("GRADPOWER_TEST_LAUNCH_TIMEOUT") or timeout))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(map(str, cmd))} still running after {limit:g} s; killed. Its output ended:\n"
                        f"{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(script, *args, nproc: int = 2, timeout: int = 900, env: dict | None = None, check: bool = True):
    """Runs `script args` on `nproc` local ranks with torch.distributed.run (1 OpenMP thread each).

    With `check`, fails the test with the tail of stderr when the job exits non-zero; returns the CompletedProcess.
    """
    env = launch_env(**(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = run_launched(cmd, timeout, env=env)
    assert proc.returncode == 0 or not check, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-8000:]}"
    return proc


MEGATRON_CPU_ENV = {"GRADPOWER_MEGATRON_CPU_SHIM": "1",
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "megatron_cpu_site"),
                                                   str(Path(__file__).parent.parent)])}
"""Environment for launching megatron-core product commands on the CPU (tests/megatron_cpu_site)."""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two hosts h0, h1 (tests/multihost.py: network namespaces with an sshd each) for the module's tests, torn
    down after them. Where this machine cannot make them the tests skip saying why; under CI (GRADPOWER_CI=1),
    which must run them, they fail instead."""
    cluster = Cluster(2, tmp_path_factory.mktemp("hosts"))
    try:
        cluster.start()
    except Unavailable as error:
        not_here = pytest.fail if os.environ.get("GRADPOWER_CI") == "1" else pytest.skip
        not_here(f"cannot make hosts for the multi-host tests: {error}")
    try:
        yield cluster
    finally:
        cluster.close()
