"""The Megatron MoE job across real hosts (tests/multihost.py): launch/megatron_moe.sh started over ssh on each of
two hosts, its torchrun meeting the other's at a c10d rendezvous on h0 (RDZV_ENDPOINT), 1 rank per host, gloo over
the hosts' eth0; the same losses and final weights, bit for bit, as the same command with 2 ranks on one host.

The job is launch/megatron_moe.sh's own (distributed optimizer, bf16, 4 experts top-2, EP=2, GPAS from its default
--gradpower-config) with ``--optimizer adampower`` given as a flag; tests/megatron_cpu_site installs the test-only
CPU shim in each rank. 2 ranks sum in the same order wherever they run (a + b == b + a), and expert parallelism puts
experts 0-1 on rank 0 and 2-3 on rank 1 in both runs, hence bitwise equality.
"""

import os
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import JIT_ENV, MEGATRON_CPU_ENV, free_port, run_launched

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

from test_megatron_pretrain import ROOT, TINY, checkpoint_tensors, metrics  # noqa: E402

SCRIPT = ROOT / "launch" / "megatron_moe.sh"
ARGS = [*TINY, "--train-iters", "4", "--optimizer", "adampower"]
TIMEOUT = 400
COMPARED = ("train_loss", "val_loss", "lr")  # metrics.csv's columns that do not depend on speed


def node_env(run_dir, **extra) -> dict:
    """What each node's megatron_moe.sh gets: the CPU shim, one OpenMP thread, the JIT cache, gloo on eth0."""
    return dict(MEGATRON_CPU_ENV, **JIT_ENV, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0",
                GRADPOWER_CACHE_DIR=os.environ["GRADPOWER_CACHE_DIR"], PYTHON=sys.executable, RUN_DIR=str(run_dir),
                **extra)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """launch/megatron_moe.sh on this machine with 2 ranks: its run folder."""
    run_dir = tmp_path_factory.mktemp("megatron_one_host") / "run"
    proc = run_launched(["bash", SCRIPT, *ARGS], TIMEOUT, cwd=ROOT,
                        env=dict(os.environ, **node_env(run_dir, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return run_dir


@pytest.fixture(scope="module")
def two_hosts(hosts, tmp_path_factory):
    """launch/megatron_moe.sh on h0 and h1, each started from h0 by ``ssh <host> env ... bash megatron_moe.sh``
    (NNODES=2, 1 rank per node, RDZV_ENDPOINT h0's address, LOCAL_ADDR the node's own): (run folder, each node's
    output). Fails with the output when a node exits non-zero or leaves a process behind."""
    run_dir = tmp_path_factory.mktemp("megatron_two_hosts") / "run"
    h0 = hosts.hosts[0]
    endpoint = f"{h0.address}:{free_port()}"
    nodes = []
    for host in hosts.hosts:
        env = node_env(run_dir, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, LOCAL_ADDR=host.address)
        remote = " ".join(["cd", shlex.quote(str(ROOT)), "&&", "env", *(shlex.quote(f"{k}={v}") for k, v in env.items()),
                           "bash", shlex.quote(str(SCRIPT)), *map(shlex.quote, ARGS)])
        nodes.append(subprocess.Popen(h0.cmd(hosts.bin / "ssh", host.name, remote), env=hosts.env(dict(os.environ)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outputs = []
    try:
        outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
    for host, node, output in zip(hosts.hosts, nodes, outputs):
        assert node.returncode == 0, f"{host.name} exited {node.returncode}:\n{output[-6000:]}"
    assert hosts.busy() == {}, "processes left on the hosts after the Megatron job"
    return run_dir, outputs


@pytest.mark.slow
def test_megatron_job_across_hosts_equals_one_host(two_hosts, one_host):
    run_dir, outputs = two_hosts
    log = "".join(outputs)
    assert "2 ranks (DP=2), 4 experts top-2, EP=2 | adampower (p=1.2) | GPAS silu, distributed optimizer | bf16" in log
    rows, single = metrics(run_dir), metrics(one_host)
    assert sorted(rows) == sorted(single) == [1, 2, 3, 4]
    for step in rows:
        for key in COMPARED:
            assert rows[step][key] == single[step][key], (step, key)
    assert float(rows[4]["train_loss"]) < float(rows[1]["train_loss"])  # it trains
    # the model's tensors (as test_megatron_pretrain compares them); the distributed optimizer's flat buffers
    # (chained_*) carry uninitialized bucket padding (77 of 66,624 elements differed, by up to 4e15)
    weights, single_weights = ({k: v for k, v in checkpoint_tensors(path / "iter_0000004").items()
                                if not k.startswith("chained_")} for path in (run_dir, one_host))
    assert weights.keys() == single_weights.keys() and len(weights) > 10
    assert any("experts" in k for k in weights)
    assert [k for k in weights if not torch.equal(weights[k], single_weights[k])] == []


def test_launch_script_refuses_a_bad_rendezvous(tmp_path):
    for env, named in (({"RDZV_ENDPOINT": "h0"}, "RDZV_ENDPOINT must be host:port, got 'h0'"),
                       ({"RDZV_ENDPOINT": "h0:29400", "MASTER_ADDR": "h0"}, "RDZV_ENDPOINT replaces MASTER_ADDR")):
        result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, NPROC_PER_NODE="1", **env))
        assert result.returncode == 2 and named in result.stderr, result.stderr
