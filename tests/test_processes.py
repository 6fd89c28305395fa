"""gradpower_ds.jobs.processes.exit_when_done: how every launched entry point ends (the main jobs, the test jobs and the
benchmarks). It leaves without interpreter finalization, so these tests check that nothing a normal exit delivers
is lost: the exit status, buffered output, atexit handlers, logging handlers and non-daemon threads, and that
an open thread pool does not keep it from ending."""

import subprocess
import sys
import textwrap

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
