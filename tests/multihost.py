"""Separate hosts on one machine for the multi-node tests: network namespaces joined by a bridge, an sshd in each.

``Cluster(n, folder)`` (a context manager; conftest's ``hosts`` fixture gives one of 2 hosts) makes host i
the network namespace ``gpds<pid>-<k>-h<i>`` (pid: the creating process, k: its k-th Cluster) with ``lo``
and one interface, ``eth0`` on every host, at 10.213.0.<i+1>/24. The eth0s are veth pairs whose other
ends sit on a bridge in a namespace of its own (``gpds<pid>-<k>-net``): the addresses exist only in
namespaces the test made, and nothing is routed to or from the machine's own network.

Each host runs ``/usr/sbin/sshd`` at its address with a host key, config and log in the host's folder;
one client key, ``authorized_keys``, ``known_hosts`` (the hosts' own keys: strict checking) and an
``ssh_config`` naming the hosts ``h0``, ``h1``, ... live in ``folder``. A wrapper ``ssh`` that adds
``-F ssh_config`` comes first on the PATH of ``Cluster.env()``, so the ``ssh`` of DeepSpeed's
launcher and of pdsh (``PDSH_RCMD_TYPE=ssh`` runs the ``ssh`` on PATH) reach every host by name.

The hosts share the filesystem (the venv and the checkout work on every host, as on nodes with a
shared home); each host has its own folder, ``Host.folder``, for what must not be shared. A host
can run a command (``Host.cmd``, ``Host.run``), be cut off (``set_link``), lose its sshd
(``stop_sshd``) or every process (``kill_all``). Leaving the context, on success, failure or
timeout, kills every process in the namespaces (sshd and whatever it started) and deletes the
namespaces, and with them the links; a run killed before it could do that leaves namespaces named
after its dead pid, which the next ``Cluster`` removes. Every command is bounded in time
(COMMAND_TIMEOUT).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

COMMAND_TIMEOUT = 30  # seconds, for each ip/ssh-keygen/ssh command
PREFIX = "gpds"  # namespace names: gpds<pid of the creating process>-<serial>-h<i>, ...-net
SUBNET = "10.213.0"  # host i: 10.213.0.<i+1>/24
_serial = itertools.count()
SSHD = shutil.which("sshd", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin", os.environ.get("PATH", "")]))


class Unavailable(RuntimeError):
    """This machine cannot make the hosts (the message says why)."""


def unavailable() -> str | None:
    """Why this machine cannot host a Cluster (not root, a command missing), or None when it can."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): network namespaces and an sshd per host need root"
    missing = [f"{command} ({package})" for command, package, found in (
        ("ip", "iproute2", shutil.which("ip")), ("sshd", "openssh-server", SSHD),
        ("ssh", "openssh-client", shutil.which("ssh")), ("ssh-keygen", "openssh-client", shutil.which("ssh-keygen")),
        ("pdsh", "pdsh", shutil.which("pdsh"))) if not found]
    if missing:
        return (f"missing {', '.join(missing)}: apt-get install -y openssh-server pdsh iproute2 (tests/run.sh does "
                "it as root)")
    return None


def run(cmd: list, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `cmd` with output captured, for at most `timeout` s; with `check`, RuntimeError naming the command and
    its stderr when it exits non-zero."""
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def netns_pids(netns: str) -> list[int]:
    """The processes in network namespace `netns` (none when it is gone)."""
    return [int(pid) for pid in run(["ip", "netns", "pids", netns], check=False).stdout.split()]


def kill_netns(netns: str, timeout: float = 10) -> None:
    """SIGKILLs every process in `netns` until none is left; RuntimeError if some outlive `timeout` s."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(netns):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {netns} survived SIGKILL for {timeout:g} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete_netns(netns: str) -> None:
    """Kills what runs in `netns` and deletes it (with its interfaces); nothing when it does not exist."""
    if Path("/run/netns", netns).exists():
        kill_netns(netns)
        run(["ip", "netns", "delete", netns])


def remove_stale_namespaces() -> None:
    """Deletes the namespaces of Clusters whose creating process is dead (a run killed before its teardown)."""
    for name in run(["ip", "netns", "list"]).stdout.split():
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+-\w+", name)
        if match and not Path("/proc", match[1]).exists():
            delete_netns(name)


class Host:
    """One host: its network namespace, name (h0, ...), address, folder and sshd."""

    def __init__(self, index: int, folder: Path, prefix: str):
        self.index = index
        self.name = f"h{index}"
        self.netns = f"{prefix}-{self.name}"
        self.address = f"{SUBNET}.{index + 1}"
        self.folder = folder / self.name
        self.sshd: subprocess.Popen | None = None
        self.private: Path | None = None  # a folder only this host's ssh sessions see as their own (private())

    def cmd(self, *args) -> list[str]:
        """`args` as a command that runs inside this host (its network namespace)."""
        return ["ip", "netns", "exec", self.netns, *map(str, args)]

    def run(self, *args, timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Runs `args` inside this host; see `run`."""
        return run(self.cmd(*args), timeout=timeout, check=check)

    def pids(self) -> list[int]:
        """Every process running on this host."""
        return netns_pids(self.netns)

    def kill_all(self) -> None:
        """SIGKILLs every process on this host, sshd included (start_sshd() brings ssh back)."""
        kill_netns(self.netns)
        if self.sshd is not None:
            self.sshd.wait(COMMAND_TIMEOUT)
            self.sshd = None

    def set_link(self, up: bool) -> None:
        """Puts this host's eth0 up or down (down: the host is cut off, its processes keep running)."""
        self.run("ip", "link", "set", "eth0", "up" if up else "down")

    def start_sshd(self) -> None:
        """Starts this host's sshd (its own config, host key and log in the host's folder)."""
        config = self.folder / "sshd_config"
        sshd = [SSHD, "-D", "-f", config, "-E", self.folder / "sshd.log"]
        if self.private is not None:  # sshd, and every session it starts, in a mount namespace with the bind mount
            own = self.folder / "private"
            own.mkdir(exist_ok=True)
            sshd = ["sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"', own, self.private, *sshd]
        self.sshd = subprocess.Popen(self.cmd(*sshd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop_sshd(self) -> None:
        """Stops this host's sshd (sessions it started keep running, new ssh connections are refused)."""
        if self.sshd is not None:
            self.sshd.kill()
            self.sshd.wait(COMMAND_TIMEOUT)
            self.sshd = None


class Cluster:
    """`n` hosts (`hosts`, h0 first) with sshd, ssh_config and keys under `folder`; a context manager."""

    def __init__(self, n: int, folder: Path):
        self.folder = Path(folder)
        prefix = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self.hosts = [Host(i, self.folder, prefix) for i in range(n)]
        self.switch = f"{prefix}-net"
        self.ssh_config = self.folder / "ssh_config"
        self.bin = self.folder / "bin"

    def start(self) -> Cluster:
        """Brings the hosts up (Unavailable where this machine cannot); on any error tears down what it made."""
        reason = unavailable()
        if reason:
            raise Unavailable(reason)
        remove_stale_namespaces()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._network()
            self._ssh()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _network(self) -> None:
        """The switch namespace with bridge br0, each host's namespace with eth0 (a veth pair to br0) and lo."""
        try:
            run(["ip", "netns", "add", self.switch])
        except RuntimeError as error:
            raise Unavailable(f"cannot create a network namespace: {error}") from None
        run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.switch, "link", "set", "br0", "up"])
        for host in self.hosts:
            run(["ip", "netns", "add", host.netns])
            port = f"p{host.index}"
            run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                 host.netns])
            run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
            run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            run(["ip", "-n", host.netns, "link", "set", "lo", "up"])

    def _ssh(self) -> None:
        """Keys, configs, an sshd on every host, the ssh wrapper; then checks that h0 reaches every host by name."""
        key = self.folder / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gradpower-ds-test", "-f", key])
        (self.folder / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        known_hosts, client = [], []
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for host in self.hosts:
            host.folder.mkdir(parents=True)
            host_key = host.folder / "ssh_host_ed25519_key"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", host_key])
            (host.folder / "sshd_config").write_text(
                f"ListenAddress {host.address}\nHostKey {host_key}\nPidFile {host.folder / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "X11Forwarding no\nPrintMotd no\n")
            host.start_sshd()
            known_hosts.append(f"{host.name},{host.address} {Path(f'{host_key}.pub').read_text()}")
            client.append(f"Host {host.name}\n    HostName {host.address}\n")
        (self.folder / "known_hosts").write_text("".join(known_hosts))
        self.ssh_config.write_text("".join(client) + (
            f"Host *\n    IdentityFile {key}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.folder / 'known_hosts'}\n    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n    ConnectTimeout 5\n    LogLevel ERROR\n"))
        self.bin.mkdir()
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {self.ssh_config} "$@"\n')
        wrapper.chmod(0o755)
        for host in self.hosts:
            self.wait_for_ssh(host)

    def wait_for_ssh(self, host: Host, timeout: float = 10) -> None:
        """Waits until `ssh <host> true` from h0 succeeds (its sshd is up); RuntimeError with sshd's log if not."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self.hosts[0].run(self.bin / "ssh", host.name, "true", check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = host.folder / "sshd.log"
                raise RuntimeError(f"ssh {host.name} from h0 failed for {timeout:g} s: {proc.stderr.strip()}; "
                                   f"sshd log: {log.read_text() if log.exists() else '(none)'}")
            time.sleep(0.1)

    def env(self, base: dict, **extra) -> dict:
        """`base` with the ssh wrapper first on PATH and pdsh set to ssh, then `extra`: for commands on h0."""
        return dict(base, PATH=os.pathsep.join([str(self.bin), base.get("PATH", "")]), PDSH_RCMD_TYPE="ssh", **extra)

    def busy(self, timeout: float = 5) -> dict[str, list[int]]:
        """The processes other than the sshd listeners on each host that still has some after up to `timeout` s
        ({} once every host is idle): what a finished or failed job left behind."""
        deadline = time.monotonic() + timeout
        while True:
            left = {host.name: pids for host in self.hosts
                    if (pids := [pid for pid in host.pids() if not host.sshd or pid != host.sshd.pid])}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def private(self, path: Path | None) -> None:
        """Gives every host its own `path` (made here): a bind mount of the host's folder/private over it in the mount
        namespace of its sshd, so what runs there over ssh sees only its own files at `path`, as on nodes without a
        shared filesystem; None: back to the shared folder. Restarts the sshds."""
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            host.stop_sshd()
            host.private = path
            host.start_sshd()
        for host in self.hosts:
            self.wait_for_ssh(host)

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        """Writes a DeepSpeed hostfile naming every host with `slots` ranks; returns its path."""
        path.write_text("".join(f"{host.name} slots={slots}\n" for host in self.hosts))
        return path

    def close(self) -> None:
        """Kills everything on the hosts and deletes their namespaces and the switch's (links go with them)."""
        for host in self.hosts:
            host.stop_sshd()
            delete_netns(host.netns)
        delete_netns(self.switch)
