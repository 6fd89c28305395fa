"""One run at a time in a run folder, and no orphaned ranks (issue 35).

``gradpower_ds.jobs.run_lock.RunLock``: a second taker is refused naming the holder, a lock is free again on any
exit of its holder, a dead holder's lock file is taken over saying so. The launched tests (2 ranks of the main
job on the CPU, and the Megatron job in one process) check what a user sees: a second ``--resume true`` into
a live run's folder is refused at once while the first goes on, and when its torchrun is SIGKILLed every rank
saves and exits within seconds, leaving a checkpoint the run resumes from to completion.
"""

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import MEGATRON_CPU_ENV, free_port, launch_env, run_launched, wait_for_running_step
from gradpower_ds.jobs import compare, run_lock
from gradpower_ds.jobs.metrics import read_metrics
from gradpower_ds.jobs.run_dir import RunDirError
from gradpower_ds.jobs.run_lock import LOCK_FILE, RunLock, lock_run_dir
from gradpower_ds.jobs.train import prepare_run_dir
from gradpower_ds.jobs.train_config import TrainConfig
from test_train import QUICKSTART, ROOT, TINY

HOLDER = """
import os, sys
from gradpower_ds.jobs.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
how = sys.stdin.readline().strip()  # the test says how to end
if how == "hard":
    os._exit(0)  # no atexit handlers: the file stays, naming this process
"""


def start_holder(run_dir) -> subprocess.Popen:
    """A process holding run_dir's lock until the test writes how it ends ("exit": normally, "hard": os._exit)
    to its stdin or kills it."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline() == "held\n"
    return proc


def end_holder(proc: subprocess.Popen, how: str) -> None:
    if how == "SIGKILL":
        proc.kill()
    else:
        proc.stdin.write(how + "\n")
        proc.stdin.flush()
    proc.wait(timeout=60)


def test_a_second_taker_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        with pytest.raises(RunDirError) as refused:
            RunLock(run_dir).acquire()
        message = str(refused.value)
        assert message.startswith(f"run_dir {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()} "
                                  "since "), message
        assert "(command " in message and str(run_dir) in message.split("(command ", 1)[1]
        assert message.endswith("wait for it to end or stop it (SIGTERM saves and stops), or choose another run_dir")
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert set(record) == {"host", "pid", "started", "command"} and record["pid"] == holder.pid
    finally:
        end_holder(holder, "exit")
    assert holder.returncode == 0
    assert not (run_dir / LOCK_FILE).exists()  # a clean exit deletes the file


@pytest.mark.parametrize("how", ["exit", "hard", "SIGKILL"])
def test_the_lock_is_free_after_any_exit_of_its_holder(tmp_path, caplog, how):
    """Exit, os._exit and SIGKILL all release the lock; a file left naming a dead holder is taken over, logged."""
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    end_holder(holder, how)
    assert (run_dir / LOCK_FILE).exists() == (how != "exit")
    with caplog.at_level(logging.WARNING, logger=run_lock.__name__):
        lock = RunLock(run_dir).acquire()
    try:
        stale = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
        if how == "exit":
            assert stale == []
        else:
            assert len(stale) == 1 and f"taking over the lock of pid {holder.pid} on host" in stale[0], stale
            assert "which is gone" in stale[0]
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirError, match=f"is in use by pid {os.getpid()} "):
            RunLock(run_dir).acquire()  # another open file, another taker: refused in the same process too
    finally:
        lock.release()
    assert not (run_dir / LOCK_FILE).exists()


def test_only_global_rank_0_takes_it_and_the_run_folder_check_ignores_it(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    assert lock_run_dir(run_dir) is None and not run_dir.exists()
    assert lock_run_dir(None) is None
    monkeypatch.setenv("RANK", "0")
    lock = lock_run_dir(run_dir)
    try:
        assert (run_dir / LOCK_FILE).exists()
        assert prepare_run_dir(TrainConfig(run_dir=str(run_dir))) == run_dir  # still a new run folder
    finally:
        lock.release()


def test_a_filesystem_without_locks_is_refused_clearly(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with pytest.raises(RunDirError, match=r"its filesystem does not support file locks \(flock: No locks "
                                          r"available\).*put run_dir on a filesystem with locks"):
        RunLock(tmp_path / "run").acquire()


# ---- launched runs ------------------------------------------------------------------------------------------------

def _children(pid: int, needle: str, count: int, proc: subprocess.Popen, deadline: float) -> list:
    """The `count` processes under `pid` whose command line holds `needle`, once they all exist."""
    def command(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # exited meanwhile
            return ""

    while time.time() < deadline and proc.poll() is None:
        found = [p for p in psutil.Process(pid).children(recursive=True) if needle in command(p)]
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} processes running {needle} did not start under pid {pid}")


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _files(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_one_run_per_folder_and_no_orphans_when_torchrun_is_killed(tmp_path):
    """A 2-rank run under torchrun. A second `--resume true` into its folder is refused naming its rank 0, and
    writes nothing there (the first run's ranks are held with SIGSTOP meanwhile, so it cannot end first); the
    first run then goes on. Then torchrun alone is SIGKILLed (as a scheduler does): both ranks notice, finish
    the step, save, mark the run stopped and exit within seconds, and the run resumes from that checkpoint
    to completion."""
    run_dir = tmp_path / "run"
    job = ["--config", str(QUICKSTART), *TINY, "--run_dir", str(run_dir), "--steps", "200", "--save_every", "5",
           "--eval_every", "100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "gradpower_ds.jobs.train", *job]
    first = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=ROOT, start_new_session=True)

    def signal_ranks(signum):
        for rank in ranks:
            rank.send_signal(signum)
        while signum == signal.SIGSTOP and any(rank.status() != psutil.STATUS_STOPPED for rank in ranks):
            time.sleep(0.01)

    try:
        deadline = time.time() + 300
        ranks = _children(first.pid, "gradpower_ds.jobs.train", 2, first, deadline)
        rank0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        status = wait_for_running_step(run_dir, first, 5, deadline)
        assert status is not None and status["step"] >= 5, status

        signal_ranks(signal.SIGSTOP)
        before = _files(run_dir)
        second = run_launched(compare.launch_command(2, free_port(), [*job, "--resume", "true"]), 300,
                              env=launch_env(), cwd=ROOT)
        assert _files(run_dir) == before  # the refused run wrote nothing
        signal_ranks(signal.SIGCONT)
        assert second.returncode == 2, (second.stdout + second.stderr)[-4000:]
        assert (f"gradpower_ds.jobs.train: error: run_dir {run_dir} is in use by pid {rank0.pid} on host "
                f"{socket.gethostname()} since ") in second.stderr, second.stderr[-4000:]
        assert "Traceback" not in second.stderr
        paused = json.loads((run_dir / "status.json").read_text())
        later = wait_for_running_step(run_dir, first, paused["step"] + 1, deadline)
        assert later is not None and later["step"] > paused["step"], later  # the first run goes on

        signal_ranks(signal.SIGSTOP)  # so that the kill finds the run mid-way, however fast its steps are
        os.kill(first.pid, signal.SIGKILL)  # torchrun only
        signal_ranks(signal.SIGCONT)
        deadline = time.time() + 60
        while time.time() < deadline and not all(_gone(p) for p in ranks):
            time.sleep(0.05)
        assert all(_gone(p) for p in ranks), [p.pid for p in ranks if not _gone(p)]
        out, _ = first.communicate(timeout=60)  # what the ranks printed, until they closed the pipe
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert out.count(f"launcher (pid {first.pid}) died: stopping") == 2, out[-4000:]  # a line from each rank
    stopped = json.loads((run_dir / "status.json").read_text())
    assert stopped["state"] == "stopped" and stopped["signal"] == "SIGTERM" and stopped["step"] < 200, stopped
    step = stopped["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step}"
    assert not (run_dir / LOCK_FILE).exists()  # rank 0 exited cleanly: it released the folder

    resumed = run_launched(compare.launch_command(2, free_port(), [*job, "--resume", "true"]), 900,
                           env=launch_env(), cwd=ROOT)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resumed at step {step}" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "complete", "step": 200}
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == list(range(1, 201))


@pytest.mark.slow
def test_megatron_job_refuses_a_save_folder_in_use(tmp_path):
    """The Megatron job takes the same lock on its --save folder: refused at once, exit 2, naming the holder."""
    save = tmp_path / "save"
    with RunLock(save):
        result = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.train_megatron", "--train-iters", "2",
                                 "--lr-warmup-iters", "0", "--save", str(save)], capture_output=True, text=True,
                                cwd=ROOT, env=launch_env(**MEGATRON_CPU_ENV), timeout=300)
        assert sorted(p.name for p in save.iterdir()) == [LOCK_FILE]  # the job wrote nothing there
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gradpower_ds.jobs.train_megatron: error: run_dir {save} is in use by pid {os.getpid()} "
                           f"on host {socket.gethostname()} since "), result.stderr[-3000:]
    assert last.endswith("or choose another run_dir") and "Traceback" not in result.stderr
