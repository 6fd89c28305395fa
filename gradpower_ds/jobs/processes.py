"""What a training process needs to know about the processes around it, for both jobs and the runner.

``launched()``: whether a launcher set up a multi-process job; ``default_to_world_of_one()``:
torch.distributed's env:// variables for one process when none did; ``free_port()``: a port for a
rendezvous on this machine; ``exit_when_done()``:
how a rank's entry point ends, without the gloo abort at interpreter exit; ``exit_with_launcher()``: a rank
stops when its launcher dies instead of training on as an orphan.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, NoReturn

# Variables by which DeepSpeed's init_distributed finds a multi-process job other than torch's env:// ones
# (MPI discovery, Azure ML, SageMaker): there default_to_world_of_one leaves the environment alone.
CLUSTER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "AZUREML_EXPERIMENT_ID",
               "SM_TRAINING_ENV")
LAUNCHER_POLL_S = 1.0  # how often a rank checks that its launcher lives
LAUNCHER_GRACE_S = 30.0  # how long a rank whose launcher died may take to save and stop before it exits hard
_log = logging.getLogger(__name__)


def launched() -> bool:
    """Whether a launcher set up a multi-process job: torch's env:// variables (RANK or WORLD_SIZE) or one of
    CLUSTER_ENV (MPI, Azure ML, SageMaker), which DeepSpeed discovers itself."""
    return any(name in os.environ for name in ("RANK", "WORLD_SIZE", *CLUSTER_ENV))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_to_world_of_one() -> bool:
    """Sets torch.distributed's env:// variables for a single process when no launcher set up a job (`launched()`
    is false: ``python -m gradpower_ds.jobs.run ...``, ``python -m gradpower_ds train``); returns whether it did.

    Without them DeepSpeed's init_distributed falls back to MPI discovery and fails with
    ``No module named 'mpi4py'``. Variables already set (MASTER_ADDR, MASTER_PORT) are kept; an unset
    MASTER_PORT becomes a free port, so single-process runs side by side do not collide.
    """
    if launched():
        return False
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    return True


def exit_when_done(entry: Callable[[], object]) -> NoReturn:
    """Runs a process's entry point, then ends the process with its exit status (0, or that of the SystemExit it
    raised) after the atexit handlers and a flush of stdout and stderr, but without Python's interpreter
    finalization. An exception other than SystemExit propagates as usual.

    Why: the worker threads of a gloo process group outlive ``destroy_process_group()`` (DeepSpeed keeps
    references to the groups in parameters, engines and module globals), and one of them can drop the last
    reference to a tensor that Python knew (a finished all-gather that a later barrier kept alive) after
    finalization has begun. On Python before 3.14 that thread is then unwound through a noexcept destructor
    and the rank aborts with "terminate called without an active exception" (SIGABRT) after all its work is
    done: 2 of 15 ZeRO-3 test jobs did on a 2-core VM (pytorch/pytorch#190489). For the last statement of a
    launched script, whose files are closed by then.
    """
    code: object = 0
    try:
        entry()
    except SystemExit as stop:
        code = stop.code
    threading._shutdown()  # what a normal exit does first: stop thread pools (their exit hooks), join the threads
    atexit._run_exitfuncs()  # logging.shutdown among them; a normal exit runs them before finalization too
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what SystemExit("message") prints
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def exit_with_launcher(poll_s: float = LAUNCHER_POLL_S, grace_s: float = LAUNCHER_GRACE_S) -> threading.Thread | None:
    """Makes a launched rank (``launched()``) stop when its launcher dies; returns the watchdog thread (None: not
    launched, nothing to watch).

    A launcher killed outright (SIGKILL from a scheduler, an OOM kill) cannot stop its ranks, which would train
    on as orphans beside the next run. A daemon thread notices that the parent process changed (the rank was
    re-parented) within `poll_s` seconds, logs it and sends SIGTERM to its own process: the jobs then finish
    the step on all ranks, save a checkpoint, mark the run stopped and exit 143 (``run_dir.StopRequest``).
    A rank still alive `grace_s` seconds later (stuck in a collective whose peer is gone) exits at once with
    143. Checkpoints stay loadable either way: the jobs move their `latest` pointer only once one is whole.
    (A polling thread rather than prctl's PR_SET_PDEATHSIG, which fires when the thread that started the
    rank exits, not the launcher process.)
    """
    if not launched():
        return None
    launcher = os.getppid()
    watchdog = threading.Thread(target=_stop_when_orphaned, args=(launcher, poll_s, grace_s), daemon=True,
                                name="exit_with_launcher")
    watchdog.start()
    return watchdog


def _stop_when_orphaned(launcher: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == launcher:
        time.sleep(poll_s)
    rank = os.environ.get("RANK", "?")
    _log.warning("rank %s (pid %d): launcher (pid %d) died: stopping (SIGTERM: finish the step, save, exit; "
                 "a hard exit after %g s)", rank, os.getpid(), launcher, grace_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    _log.warning("rank %s (pid %d): still running %g s after its launcher died: exiting now", rank, os.getpid(),
                 grace_s)
    os._exit(128 + signal.SIGTERM)
