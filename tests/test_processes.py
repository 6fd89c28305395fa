"""gradpower_ds.jobs.processes.exit_when_done: how every launched entry point ends (the main jobs, the test jobs and the
benchmarks). It leaves without interpreter finalization, so these tests check that nothing a normal exit delivers
is lost: the exit status, buffered output, atexit handlers, logging handlers and non-daemon threads, and that
an open thread pool does not keep it from ending. And exit_with_launcher: a rank whose launcher is killed stops
(SIGTERM to itself, then a hard exit after the grace period) instead of living on as an orphan."""

import subprocess
import sys
import textwrap
import time

import pytest

ENTRY = """
import atexit, concurrent.futures, logging, sys, threading, time
from pathlib import Path
from gradpower_ds.jobs.processes import exit_when_done

out = Path(sys.argv[1])
log = logging.getLogger("job")
log.addHandler(logging.FileHandler(out / "job.log", delay=True))
log.setLevel(logging.INFO)
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late_writer():
    time.sleep(0.3)
    (out / "thread").write_text("finished")

def entry():
    threading.Thread(target=late_writer).start()  # not a daemon: the exit waits for it
    global pool
    pool = concurrent.futures.ThreadPoolExecutor(2)  # left open and alive, as torch inductor's compile pool is
    assert pool.submit(lambda: 2).result() == 2
    log.info("logged")
    sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until the exit flushes it
    {finish}

exit_when_done(entry)
"""


def run_entry(tmp_path, finish: str) -> subprocess.CompletedProcess:
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent(ENTRY).replace("{finish}", finish))
    return subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("finish, status", [("return 'ignored'", 0), ("raise SystemExit(3)", 3),
                                            ("raise SystemExit(None)", 0), ("raise SystemExit(0)", 0)])
def test_exit_status_and_everything_a_normal_exit_delivers(tmp_path, finish, status):
    proc = run_entry(tmp_path, finish)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "job.log").read_text() == "logged\n"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"


def test_system_exit_with_a_message_prints_it_and_exits_1(tmp_path):
    proc = run_entry(tmp_path, "raise SystemExit('job: --steps must be positive')")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "job: --steps must be positive"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_other_exceptions_propagate_as_usual(tmp_path):
    proc = run_entry(tmp_path, "raise ValueError('bad batch')")
    assert proc.returncode == 1
    assert proc.stderr.rstrip().endswith("ValueError: bad batch"), proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran"  # the interpreter's own exit ran it


# ---- exit_with_launcher: no orphaned ranks --------------------------------------------------------------------------

RANK = """
import logging, os, signal, sys, time
from pathlib import Path
from gradpower_ds.jobs.processes import exit_with_launcher

out, behaviour = Path(sys.argv[1]), sys.argv[2]
logging.basicConfig(format="%(message)s")
asked = []
# "stops": as the jobs' StopRequest, the signal is recorded and the loop saves and exits; "stuck": it never does
signal.signal(signal.SIGTERM, (lambda signum, frame: asked.append(signum)) if behaviour == "stops" else signal.SIG_IGN)
exit_with_launcher(poll_s=0.05, grace_s=0.5)
(out / "watching").write_text("")
while not asked:
    time.sleep(0.01)
(out / "stopped").write_text(signal.Signals(asked[0]).name)
sys.exit(143)
"""

LAUNCHER = """
import os, subprocess, sys, time
with open(os.path.join(sys.argv[1], "rank.log"), "w") as log:
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1], sys.argv[2]], stderr=log,
                            env=dict(os.environ, RANK="0", WORLD_SIZE="1"))
print(rank.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("behaviour", ["stops", "stuck"])
def test_a_rank_stops_when_its_launcher_is_killed(tmp_path, behaviour):
    """SIGKILL to the launcher alone: the rank logs it and gets SIGTERM (the jobs then save and stop); a rank
    that does not stop after the grace period exits hard. Either way it is gone."""
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAUNCHER), str(tmp_path), behaviour,
                                 textwrap.dedent(RANK)], stdout=subprocess.PIPE, text=True)
    try:
        rank = int(launcher.stdout.readline())
        assert _wait_until(lambda: (tmp_path / "watching").exists() or _gone(rank)), "the rank did not start"
        assert not _gone(rank), (tmp_path / "rank.log").read_text()
        launcher.kill()
        launcher.wait(timeout=60)
        assert _wait_until(lambda: _gone(rank)), "the rank outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    log = (tmp_path / "rank.log").read_text()
    assert f"rank 0 (pid {rank}): launcher (pid {launcher.pid}) died: stopping" in log, log
    if behaviour == "stops":
        assert (tmp_path / "stopped").read_text() == "SIGTERM" and "exiting now" not in log, log
    else:
        assert not (tmp_path / "stopped").exists()
        assert f"rank 0 (pid {rank}): still running 0.5 s after its launcher died: exiting now" in log, log


def test_nothing_to_watch_without_a_launcher(monkeypatch):
    from gradpower_ds.jobs.processes import CLUSTER_ENV, exit_with_launcher

    for name in ("RANK", "WORLD_SIZE", *CLUSTER_ENV):
        monkeypatch.delenv(name, raising=False)
    assert exit_with_launcher() is None
