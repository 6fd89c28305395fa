"""The hosts of the multi-node tests (tests/multihost.py): reached by name over ssh and pdsh, cut off, stopped and
killed on demand, torn down after an error, skipped where they cannot be made (failed under CI).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import multihost
from multihost import Cluster, remove_stale_namespaces, unavailable

ROOT = Path(__file__).resolve().parents[1]


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
