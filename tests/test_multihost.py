"""DeepSpeed across real hosts: ranks on two hosts (network namespaces with an sshd each, tests/multihost.py)
started from host 0 over ssh by the deepspeed launcher (pdsh, its default), gloo over the hosts' eth0.

First the hosts themselves: reached by name over ssh and pdsh, cut off, stopped and killed on demand, torn down
after an error, skipped where they cannot be made (failed under CI). Then, ``slow``:

- the main job (gradpower_ds.jobs.train, configs/quickstart.json, tiny, AdamPower) with 1 rank on each host, at
  ZeRO-2 (experts sharded over the hosts) through launch/multinode.sh as a user runs it, and at ZeRO-3 + CPU
  offload through ``deepspeed --hostfile``: the same losses and final checkpoint, bit for bit, as the job on 2
  ranks of one host (2 ranks sum in the same order wherever they run: a + b == b + a);
- an unchanged user script (tests/jobs/ds_train_script.py) through launch/multinode.sh, with what it needs from
  the environment (PYTHONPATH, OMP_NUM_THREADS) reaching the remote ranks;
- DeepSpeed 0.19.8 has no ``--launcher ssh``: it says so and starts nothing.

Every rank records where it ran and the environment it got (tests/multihost_site). What reaches a remote rank:
the launcher's PYTHON* variables (PYTHONPATH with the launcher's folder put first), the accelerator's (NCCL* on
GPUs, none on a CPU) and the lines of ``.deepspeed_env`` in the launcher's folder or home; nothing else.
Without GLOO_SOCKET_IFNAME there, gloo takes the address of the machine's host name (127.0.0.1 here) and the ranks
never connect. MASTER_ADDR, when not given, is the first address of ``ssh <first host> hostname -I``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multihost
from conftest import JIT_ENV, free_port, launch_env, run_launched
from gradpower_ds.jobs.metrics import read_metrics
from multihost import Cluster, remove_stale_namespaces, unavailable
from test_train import QUICKSTART, ROOT, TINY, deepspeed_train

JOB = ROOT / "tests" / "jobs" / "ds_train_script.py"
SITE = ROOT / "tests" / "multihost_site"
PYTHONPATH = os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])  # the launchers'
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TIMEOUT = 300
SETTINGS = {"zero2": [], "zero3_offload": ["--num_experts", "0", "--zero_stage", "3", "--offload_optimizer", "true"]}
COMPARED = ("step", "tokens", "train_loss", "val_loss", "lr")  # metrics.csv's columns that do not depend on speed


# ---- the hosts -----------------------------------------------------------------------------------------------------

def netns_inode(netns: str) -> int:
    """The inode that names network namespace `netns` (as /proc/<pid>/ns/net of its processes shows it)."""
    return os.stat(f"/run/netns/{netns}").st_ino


def test_hosts_reach_each_other_by_name_over_ssh_and_pdsh(hosts):
    h0 = hosts.hosts[0]
    proc = subprocess.run(h0.cmd("pdsh", "-S", "-w", "h0,h1", "readlink /proc/self/ns/net; hostname -I"),
                          env=hosts.env(dict(os.environ)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for host in hosts.hosts:  # pdsh ran the ssh wrapper on PATH: each host's sshd, in its own namespace
        assert f"{host.name}: net:[{netns_inode(host.netns)}]" in proc.stdout
        assert f"{host.name}: {host.address} \n" in proc.stdout  # eth0's address, the only one
    assert len({netns_inode(h.netns) for h in hosts.hosts}) == 2
    assert multihost.SUBNET not in multihost.run(["ip", "-o", "addr"]).stdout  # not on the machine's own network


def test_a_host_can_be_cut_off_stopped_and_killed(hosts):
    h0, h1 = hosts.hosts

    def ssh_h1() -> int:
        return h0.run(hosts.bin / "ssh", "-o", "ConnectTimeout=1", "h1", "true", check=False).returncode

    sleeper = subprocess.Popen(h1.cmd("sleep", "300"))
    assert hosts.busy(timeout=0) == {"h1": [sleeper.pid]}
    h1.set_link(False)
    assert ssh_h1() == 255 and sleeper.poll() is None
    h1.set_link(True)
    hosts.wait_for_ssh(h1)
    h1.stop_sshd()
    assert ssh_h1() == 255 and sleeper.poll() is None  # a stopped sshd leaves the host's processes running
    h1.start_sshd()
    hosts.wait_for_ssh(h1)
    h1.kill_all()
    assert sleeper.wait(5) == -9 and h1.pids() == [] and ssh_h1() == 255
    h1.start_sshd()
    hosts.wait_for_ssh(h1)
    assert hosts.busy(timeout=0) == {}


def test_hosts_are_torn_down_after_an_error(hosts, tmp_path):
    with pytest.raises(RuntimeError, match="the job failed"):
        with Cluster(2, tmp_path) as cluster:
            namespaces = [h.netns for h in cluster.hosts] + [cluster.switch]
            sshd = [h.sshd for h in cluster.hosts]
            sleeper = subprocess.Popen(cluster.hosts[1].cmd("sleep", "300"))
            raise RuntimeError("the job failed")
    assert sleeper.wait(5) == -9 and all(p.poll() is not None for p in sshd)
    assert not any(Path("/run/netns", name).exists() for name in namespaces)
    assert all(Path("/run/netns", h.netns).exists() for h in hosts.hosts)  # another Cluster's stay


def test_namespaces_of_a_dead_run_are_removed(hosts):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{multihost.PREFIX}{dead.pid}-0-h0"
    multihost.run(["ip", "netns", "add", stale])
    remove_stale_namespaces()
    assert not Path("/run/netns", stale).exists()
    assert all(Path("/run/netns", h.netns).exists() for h in hosts.hosts)  # a live run's stay


def test_unavailable_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert unavailable() == "not root (uid 1000): network namespaces and an sshd per host need root"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(multihost, "SSHD", None)
    monkeypatch.setattr(multihost.shutil, "which", lambda name: None if name == "pdsh" else f"/usr/bin/{name}")
    assert unavailable() == ("missing sshd (openssh-server), pdsh (pdsh): apt-get install -y openssh-server pdsh "
                             "iproute2 (tests/run.sh does it as root)")


@pytest.mark.slow
@pytest.mark.parametrize("ci", ["0", "1"])
def test_without_hosts_the_tests_skip_or_under_ci_fail(tmp_path, ci):
    # a PATH without ip, ssh and pdsh: the hosts cannot be made
    env = dict(os.environ, PATH=str(tmp_path), GRADPOWER_CI=ci)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsE",
                           f"{__file__}::test_hosts_reach_each_other_by_name_over_ssh_and_pdsh"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    why = "cannot make hosts for the multi-host tests: missing ip (iproute2), ssh (openssh-client)"
    assert why in proc.stdout
    assert ("1 error" if ci == "1" else "1 skipped") in proc.stdout.splitlines()[-1]
    assert proc.returncode == (1 if ci == "1" else 0)


# ---- DeepSpeed across the hosts -------------------------------------------------------------------------------------

def on_h0(hosts, folder: Path, cmd: list, **env) -> subprocess.CompletedProcess:
    """Runs `cmd` on h0 in `folder` (made here, with a .deepspeed_env) as a user would there, `env` added; fails
    with the output when it exits non-zero or leaves a process behind on a host.

    The ranks get their environment from .deepspeed_env: GLOO_SOCKET_IFNAME, one OpenMP thread, the JIT cache
    (JIT_ENV) and GRADPOWER_TEST_RANK_ENV=folder/ranks, where each rank records what reached it. The launcher's
    own environment adds tests/multihost_site to PYTHONPATH and GRADPOWER_TEST_NOT_EXPORTED=1.
    """
    (folder / "ranks").mkdir(parents=True)
    ranks_env = dict(GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", **JIT_ENV,
                     GRADPOWER_CACHE_DIR=os.environ["GRADPOWER_CACHE_DIR"], GRADPOWER_TEST_RANK_ENV=folder / "ranks")
    (folder / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ranks_env.items()))
    launcher_env = hosts.env(launch_env(PYTHONPATH=PYTHONPATH, GRADPOWER_TEST_NOT_EXPORTED="1", **env))
    proc = run_launched(hosts.hosts[0].cmd(*cmd), TIMEOUT, env=launcher_env, cwd=folder)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output[-8000:]}"
    assert hosts.busy() == {}, f"processes left on the hosts after {' '.join(map(str, cmd))}"
    return proc


def rank_records(folder: Path) -> list[dict]:
    """What ranks 0 and 1 recorded (tests/multihost_site): their network namespace and environment."""
    return [json.loads((folder / "ranks" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def tensors(obj, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a loaded checkpoint file, keyed by its path through the nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {name: t for key, value in items for name, t in tensors(value, f"{path}/{key}").items()}


def final_checkpoint(run_dir: Path, *more: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every file of the run's newest checkpoint (model, ZeRO partitions, optimizer state), in
    run_dir and in the other hosts' copies of it (`more`: their run folders, node-local storage)."""
    checkpoints = run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    files = sorted({file.name: file for folder in (run_dir, *more) for file in (folder / "checkpoints" / tag).glob("*.pt")}
                   .values())
    return {f"{file.name}{name}": t for file in files
            for name, t in tensors(torch.load(file, map_location="cpu", weights_only=False)).items()}


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The main job at each of SETTINGS as 2 ranks on this machine (deepspeed --num_gpus 2): name -> run dir."""
    folder = tmp_path_factory.mktemp("one_host")
    for name, args in SETTINGS.items():
        deepspeed_train(folder / name, *args)
    return {name: folder / name for name in SETTINGS}


@pytest.fixture(scope="module")
def two_hosts(hosts, tmp_path_factory):
    """The main job with 1 rank on each host, started on h0: ZeRO-2 by launch/multinode.sh (its default: the
    launcher reaches every host by pdsh and ssh), ZeRO-3 + offload by ``deepspeed --hostfile``; name -> (folder,
    launcher output). Neither is given MASTER_ADDR."""
    folder = tmp_path_factory.mktemp("two_hosts")
    runs = {}
    for name, args in SETTINGS.items():
        hostfile = hosts.hostfile(folder / f"{name}.hostfile")
        train = ["--config", QUICKSTART, *TINY, "--run_dir", folder / name / "run", *args]
        if name == "zero2":
            proc = on_h0(hosts, folder / name, ["bash", ROOT / "launch" / "multinode.sh", "-m",
                                                "gradpower_ds.jobs.train", *train], HOSTFILE=str(hostfile))
        else:
            proc = on_h0(hosts, folder / name, [DEEPSPEED, "--hostfile", hostfile, "--master_port", free_port(),
                                                "--module", "gradpower_ds.jobs.train", *train])
        runs[name] = folder / name, proc.stdout + proc.stderr
    return runs


@pytest.fixture(scope="module")
def user_script(hosts, tmp_path_factory):
    """tests/jobs/ds_train_script.py (configs/zero2.json) through launch/multinode.sh from h0, 1 rank per host:
    (folder, the ranks' records)."""
    folder = tmp_path_factory.mktemp("user_script")
    hostfile = hosts.hostfile(folder / "hostfile")
    on_h0(hosts, folder / "run", ["bash", ROOT / "launch" / "multinode.sh", JOB, "--deepspeed_config",
                                  ROOT / "configs" / "zero2.json", "--out", folder / "out"], HOSTFILE=str(hostfile))
    return folder / "run", [torch.load(folder / "out" / f"rank{rank}.pt") for rank in (0, 1)]


def assert_ranks_ran_on_their_hosts(hosts, folder: Path) -> None:
    """Rank i ran on host i, started there over ssh, with MASTER_ADDR h0's address and gloo on eth0."""
    for rank, (host, record) in enumerate(zip(hosts.hosts, rank_records(folder))):
        assert record["netns"] == netns_inode(host.netns), f"rank {rank} ran elsewhere"
        env = record["env"]
        assert env["SSH_CONNECTION"].split()[2] == host.address  # its sshd started it
        assert env["MASTER_ADDR"] == hosts.hosts[0].address and env["GLOO_SOCKET_IFNAME"] == "eth0"
        assert (env["WORLD_SIZE"], env["LOCAL_SIZE"]) == ("2", "1")


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_main_job_ranks_ran_on_both_hosts(hosts, two_hosts, name):
    folder, output = two_hosts[name]
    assert_ranks_ran_on_their_hosts(hosts, folder)
    # DeepSpeed asked h0 for its address (no MASTER_ADDR given) and pdsh ran the node launchers, one per host
    assert f"Using IP address of {hosts.hosts[0].address} for node h0" in output
    assert "cmd = pdsh -S -f 1024 -w h0,h1 " in output
    for rank, host in enumerate(hosts.hosts):
        assert f"{host.name}: " in output and f"nnodes=2, num_local_procs=1, node_rank={rank}" in output
    zero = "ZeRO-2" if name == "zero2" else "ZeRO-3"
    assert f"2 ranks, {zero}, " in output and "| CPUAdamPower |" in output


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_main_job_across_hosts_equals_one_host(two_hosts, one_host, name):
    run, single = two_hosts[name][0] / "run", one_host[name]
    rows, single_rows = read_metrics(run / "metrics.csv"), read_metrics(single / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in COMPARED:
        assert [r[key] for r in rows] == [r[key] for r in single_rows], key
    assert rows[0]["train_loss"] > rows[-1]["train_loss"]
    weights, single_weights = final_checkpoint(run), final_checkpoint(single)
    assert weights.keys() == single_weights.keys() and len(weights) > 10
    assert [k for k in weights if not torch.equal(weights[k], single_weights[k])] == []
    for summary in (json.loads((path / "summary.json").read_text()) for path in (run, single)):
        assert summary["world_size"] == 2 and summary["steps"] == 8


@pytest.mark.slow
def test_user_script_across_hosts_gets_its_environment(hosts, user_script):
    folder, records = user_script
    assert_ranks_ran_on_their_hosts(hosts, folder)
    assert [r["launch"] for r in records] == [dict(world_size=2, local_rank_arg=0, local_rank_env=0)] * 2
    a, b = (r["zero2"] for r in records)
    assert a["optimizer"] == b["optimizer"] == "CPUAdamPower"
    assert len(a["losses"]) == 2 * 4 and torch.isfinite(torch.tensor(a["losses"] + b["losses"])).all()  # 2 steps of 4
    assert a["params"].keys() == b["params"].keys() and all(torch.equal(a["params"][k], b["params"][k])
                                                            for k in a["params"])
    assert any(not torch.equal(a["params"][k], a["start"][k]) for k in a["params"])
    for record in rank_records(folder):
        env = record["env"]
        assert env["PYTHONPATH"] == os.pathsep.join([str(folder), PYTHONPATH])  # DeepSpeed puts its cwd first
        assert env["OMP_NUM_THREADS"] == "1"  # from .deepspeed_env
        assert env["GRADPOWER_TEST_NOT_EXPORTED"] is None  # the launcher's other variables stay on h0


@pytest.mark.slow
def test_deepspeed_offers_no_ssh_launcher(hosts, tmp_path):
    hostfile = hosts.hostfile(tmp_path / "hostfile")
    proc = run_launched(hosts.hosts[0].cmd(DEEPSPEED, "--hostfile", hostfile, "--launcher", "ssh", "--master_addr",
                                           hosts.hosts[0].address, "--module", "gradpower_ds.jobs.train"), TIMEOUT,
                        env=hosts.env(launch_env()), cwd=tmp_path)
    assert proc.returncode != 0 and "NotImplementedError: Unknown launcher ssh" in proc.stderr
    assert hosts.busy() == {}


# ---- a lost host ----------------------------------------------------------------------------------------------------

LOST = ["--steps", "16", "--dist_timeout", "20"]  # TINY's 8 steps are over before a kill lands; saves at 4, 8, 12, 16
DETECT_S = 60  # a lost host must have failed the launch within this many seconds


def start_on_h0(hosts, folder: Path, cmd: list, **env) -> subprocess.Popen:
    """`cmd` started on h0 in `folder` as on_h0 runs it (the same .deepspeed_env), in its own process group."""
    (folder / "ranks").mkdir(parents=True, exist_ok=True)
    ranks_env = dict(GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", **JIT_ENV,
                     GRADPOWER_CACHE_DIR=os.environ["GRADPOWER_CACHE_DIR"], GRADPOWER_TEST_RANK_ENV=folder / "ranks")
    (folder / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ranks_env.items()))
    return subprocess.Popen(hosts.hosts[0].cmd(*cmd), env=hosts.env(launch_env(PYTHONPATH=PYTHONPATH, **env)), cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def lost_host(hosts, tmp_path_factory):
    """The main job (ZeRO-2, 16 steps, dist_timeout 20 s) through launch/multinode.sh; once status.json says step 4
    or later ran, every process of h1 is SIGKILLed (its sshd too). Then h1's sshd is started again and the same
    command with --resume true continues the run. Returns the facts the tests check."""
    import time

    from conftest import wait_for_running_step

    folder = tmp_path_factory.mktemp("lost_host")
    hostfile = hosts.hostfile(folder / "hostfile")
    run_dir = folder / "run"
    cmd = ["bash", ROOT / "launch" / "multinode.sh", "-m", "gradpower_ds.jobs.train", "--config", QUICKSTART, *TINY,
           "--run_dir", run_dir, *LOST]
    proc = start_on_h0(hosts, folder / "first", cmd, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    try:
        status = wait_for_running_step(run_dir, proc, 4, time.time() + TIMEOUT)
        hosts.hosts[1].kill_all()
        killed = time.monotonic()
        output = proc.communicate(timeout=DETECT_S)[0]
        detect_s = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    left = hosts.busy()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    hosts.hosts[1].start_sshd()
    hosts.wait_for_ssh(hosts.hosts[1])
    on_h0(hosts, folder / "resume", [*cmd, "--resume", "true"], HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    return dict(status=status, returncode=proc.returncode, output=output, detect_s=detect_s, left=left, latest=latest,
                run_dir=run_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The lost host's run without the loss: 16 steps as 2 ranks on this machine (the same as on 2 hosts, bit for
    bit: test_main_job_across_hosts_equals_one_host)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    deepspeed_train(run_dir, *LOST)
    return run_dir


@pytest.mark.slow
def test_a_lost_host_fails_the_launch_within_bounds_naming_it(lost_host):
    status, output = lost_host["status"], lost_host["output"]
    assert status is not None and status["state"] == "running" and 4 <= status["step"] < 16, status
    assert lost_host["returncode"] not in (0, None), output[-6000:]
    assert lost_host["detect_s"] < DETECT_S
    print(f"lost host: the launch exited {lost_host['detect_s']:.1f} s after h1 was killed at step "
          f"{status['step']}; resumed from {lost_host['latest']}")
    assert "h1: " in output  # pdsh names the host whose ssh session ended
    assert lost_host["left"] == {}  # every rank on every host has exited
    assert lost_host["latest"] in {f"step{n}" for n in (4, 8, 12)}  # the last complete checkpoint before the loss


@pytest.mark.slow
def test_resume_after_a_lost_host_continues_as_an_uninterrupted_run(lost_host, uninterrupted):
    run_dir = lost_host["run_dir"]
    rows, reference = read_metrics(run_dir / "metrics.csv"), read_metrics(uninterrupted / "metrics.csv")
    assert [r["step"] for r in reference] == list(range(1, 17))
    resumed_at = int(lost_host["latest"].removeprefix("step"))
    after = [r for r in rows if r["step"] > resumed_at]
    assert [r["step"] for r in after] == list(range(resumed_at + 1, 17))
    for key in COMPARED:
        assert [r[key] for r in after] == [r[key] for r in reference[resumed_at:]], key
    weights, reference_weights = final_checkpoint(run_dir), final_checkpoint(uninterrupted)
    assert weights.keys() == reference_weights.keys() and len(weights) > 10
    assert [k for k in weights if not torch.equal(weights[k], reference_weights[k])] == []


@pytest.fixture(scope="module")
def cut_host(hosts, tmp_path_factory):
    """The lost host's run, but h1 is cut off (its link down) once step 4 or later ran: nothing on it dies, it only
    stops answering. Returns the launch's exit status, output and how long after the cut it exited (None: still
    running at CUT_DETECT_S, then killed), and what was left running on the hosts once the link was back up."""
    import time

    from conftest import wait_for_running_step

    folder = tmp_path_factory.mktemp("cut_host")
    hostfile = hosts.hostfile(folder / "hostfile")
    run_dir = folder / "run"
    cmd = ["bash", ROOT / "launch" / "multinode.sh", "-m", "gradpower_ds.jobs.train", "--config", QUICKSTART, *TINY,
           "--run_dir", run_dir, *LOST]
    proc = start_on_h0(hosts, folder / "first", cmd, HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    detect_s = None
    try:
        status = wait_for_running_step(run_dir, proc, 4, time.time() + TIMEOUT)
        hosts.hosts[1].set_link(False)
        cut = time.monotonic()
        try:
            output = proc.communicate(timeout=CUT_DETECT_S)[0]
            detect_s = time.monotonic() - cut
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output = proc.communicate()[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        hosts.hosts[1].set_link(True)
    left = hosts.busy(timeout=CUT_DETECT_S)  # h1's rank ends by itself, at its own collective's timeout
    for host in hosts.hosts:  # what is left is killed, so that the next tests start clean
        if host.name in left:
            host.kill_all()
            host.start_sshd()
            hosts.wait_for_ssh(host)
    return dict(status=status, returncode=proc.returncode, output=output, detect_s=detect_s, left=left)


CUT_DETECT_S = 90  # dist_timeout (20 s) + pdsh's ssh noticing the silent host (SSH_KEEPALIVE 10 s x 3) + slack


@pytest.mark.slow
def test_a_cut_off_host_fails_the_launch_within_dist_timeout_and_keepalive(cut_host):
    status, output = cut_host["status"], cut_host["output"]
    assert status is not None and status["state"] == "running" and 4 <= status["step"] < 16, status
    assert cut_host["detect_s"] is not None, f"the launch still ran {CUT_DETECT_S} s after h1 was cut off:\n" \
                                             f"{output[-6000:]}"
    print(f"cut-off host: the launch exited {cut_host['detect_s']:.1f} s after h1's link went down at step "
          f"{status['step']}")
    assert cut_host["returncode"] not in (0, None), output[-6000:]
    assert "h1: " in output  # pdsh names the host whose ssh session ended
    assert cut_host["left"] == {}  # h1's rank, cut off, ended at its own timeout


@pytest.mark.slow
def test_a_host_without_sshd_is_named_before_anything_starts(hosts, tmp_path):
    import time

    h1 = hosts.hosts[1]
    h1.stop_sshd()
    try:
        began = time.monotonic()
        proc = run_launched(hosts.hosts[0].cmd("bash", ROOT / "launch" / "multinode.sh", "-m",
                                               "gradpower_ds.jobs.train", "--run_dir", tmp_path / "run"), 60,
                            env=hosts.env(launch_env(HOSTFILE=str(hosts.hostfile(tmp_path / "hostfile")))),
                            cwd=tmp_path)
        took = time.monotonic() - began
    finally:
        h1.start_sshd()
        hosts.wait_for_ssh(h1)
    assert proc.returncode == 1 and took < 30
    assert "error: host h1 of " in proc.stderr and "does not answer ssh" in proc.stderr, proc.stderr
    assert "nothing was started" in proc.stderr and not (tmp_path / "run").exists()
    assert hosts.busy() == {}


# ---- checkpoints without a shared filesystem -------------------------------------------------------------------------

NODE_LOCAL = ["--deepspeed_overrides", json.dumps({"checkpoint": {"use_node_local_storage": True}})]
# DeepSpeed (0.19.8) saves an MoE model's non-expert states on data-parallel rank 0 only, use_node_local_storage or
# not: node-local resume works for dense models, hence ZeRO-2 without experts here
LOCAL_SETTINGS = {"zero2_dense": ["--num_experts", "0"], "zero3_offload": SETTINGS["zero3_offload"]}


@pytest.fixture(scope="module")
def node_local(hosts, tmp_path_factory):
    """The main job in a run folder each host has to itself (Cluster.private): at each of LOCAL_SETTINGS with
    use_node_local_storage, 4 steps (--stop_at 4) and then --resume true to 8, by ``deepspeed --hostfile``;
    and at ZeRO-2 (MoE) without it, whose resume fails. Returns name -> (h0's run folder, h1's, the failed resume),
    and "reference" -> the dense ZeRO-2 job uninterrupted on 2 ranks of this machine."""
    folder = tmp_path_factory.mktemp("node_local")
    deepspeed_train(folder / "reference", *LOCAL_SETTINGS["zero2_dense"])
    shared = folder / "private"  # the same path on every host, a different folder behind it on each
    hostfile = hosts.hostfile(folder / "hostfile")
    hosts.private(shared)
    results = {}
    try:
        for name, args in [*LOCAL_SETTINGS.items(), ("zero2_shared_only", SETTINGS["zero2"])]:
            local = [] if name == "zero2_shared_only" else NODE_LOCAL
            train = [DEEPSPEED, "--hostfile", hostfile, "--master_port", free_port(), "--module",
                     "gradpower_ds.jobs.train", "--config", QUICKSTART, *TINY, "--run_dir", shared / name, *args, *local]
            on_h0(hosts, folder / name / "first", [*train, "--stop_at", "4"])
            failed = None
            if local:
                on_h0(hosts, folder / name / "resume", [*train, "--resume", "true"])
            else:
                failed = run_launched(hosts.hosts[0].cmd(*train, "--resume", "true", "--dist_timeout", "60"), TIMEOUT,
                                      env=hosts.env(launch_env(PYTHONPATH=PYTHONPATH)), cwd=folder / name / "first")
                assert hosts.busy() == {}
            results[name] = (*(host.folder / "private" / name for host in hosts.hosts), failed)
    finally:
        hosts.private(None)
    results["reference"] = folder / "reference"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", LOCAL_SETTINGS)
def test_node_local_checkpoints_resume_exactly(node_local, two_hosts, name):
    h0_run, h1_run, _ = node_local[name]
    assert not (h1_run / "metrics.csv").exists() and (h0_run / "metrics.csv").exists()  # the hosts share nothing
    assert (h0_run / "checkpoints" / "latest").read_text().strip() == "step8"  # DeepSpeed writes it on rank 0 only
    assert (h1_run / "checkpoints" / "step8").is_dir()  # h1 keeps its own copy of each checkpoint
    uninterrupted = node_local["reference"] if name == "zero2_dense" else two_hosts[name][0] / "run"
    rows, reference = read_metrics(h0_run / "metrics.csv"), read_metrics(uninterrupted / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in COMPARED:
        assert [r[key] for r in rows] == [r[key] for r in reference], key
    weights, reference_weights = final_checkpoint(h0_run, h1_run), final_checkpoint(uninterrupted)
    assert weights.keys() == reference_weights.keys() and len(weights) > 10
    assert [k for k in weights if not torch.equal(weights[k], reference_weights[k])] == []


@pytest.mark.slow
def test_without_node_local_storage_an_unshared_resume_is_refused(node_local):
    h0_run, h1_run, failed = node_local["zero2_shared_only"]
    assert (h0_run / "checkpoints" / "latest").exists() and not (h1_run / "metrics.csv").exists()
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "--resume true: only 1 of 2 ranks see checkpoint step4 in " in output, output[-6000:]
    assert '{"checkpoint": {"use_node_local_storage": true}}' in output
    assert [r["step"] for r in read_metrics(h0_run / "metrics.csv")] == [1, 2, 3, 4]  # nothing trained
