"""One run at a time in a run folder: the lock both training jobs take on global rank 0.

``RunLock(run_dir).acquire()`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``run_dir/.gradpower.lock`` and keeps
the file open for the life of the process, so the kernel releases it on any exit (a crash, SIGKILL, ``os._exit``):
a lock whose holder is gone is free by construction. The file records its holder as JSON (host, pid, start
time, command line); a second run is refused at once with a ``RunDirError`` naming that holder. A clean release
(at exit) deletes the file; one left by a killed holder is taken over with a log line saying whose it was.

Filesystems without ``flock`` (some network filesystems answer ENOLCK, EOPNOTSUPP or ENOSYS) are refused
with a clear error rather than run unguarded: a pid check cannot tell whether a run on another node still
lives, and a shared run folder is exactly where two runs collide.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .run_dir import RunDirError

LOCK_FILE = ".gradpower.lock"  # in the run folder; the jobs' run-folder checks ignore it
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock unsupported on this filesystem
_log = logging.getLogger(__name__)


def describe(holder: dict | None) -> str:
    """The holder recorded in a lock file, for a message: "pid P on host H since T (command C)"."""
    if not holder:
        return "another run (its lock file names no holder yet: it is starting)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
            f"(command {holder.get('command')})")


class RunLock:
    """The lock of run folder `run_dir` (see the module docstring); ``acquire()`` takes it or raises RunDirError."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Takes the lock (creating the folder), records this process as its holder and releases it at exit.
        Raises RunDirError naming the holder when a live run holds it, or when the filesystem has no locks."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunDirError(f"run_dir {self.run_dir} is in use by {describe(holder)}: wait for it to end or "
                                  "stop it (SIGTERM saves and stops), or choose another run_dir") from None
            except OSError as error:
                os.close(fd)
                if error.errno in NO_LOCKS:
                    raise RunDirError(f"run_dir {self.run_dir}: its filesystem does not support file locks "
                                      f"(flock: {os.strerror(error.errno)}), so two runs in it could not be kept "
                                      "apart; put run_dir on a filesystem with locks (a local disk, NFSv4, Lustre "
                                      "mounted with -o flock)") from None
                raise
            # a releasing holder deletes the file while holding it: a lock on a deleted file guards nothing
            if _same_file(fd, self.path):
                break
            os.close(fd)
        stale = _read(fd)
        if stale:
            _log.warning("run_dir %s: taking over the lock of %s, which is gone (it ended without releasing it: "
                         "killed?)", self.run_dir, describe(stale))
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.orig_argv)}
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        atexit.register(self.release)
        return self

    def release(self) -> None:
        """Deletes the lock file and releases the lock (does nothing when not held)."""
        if self._fd is None:
            return
        atexit.unregister(self.release)
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path | None) -> RunLock | None:
    """The run folder's lock, taken by global rank 0 of a job (RANK "0" or unset); None on other ranks or without
    a folder. The process holds it until it exits (RunDirError: another run holds it)."""
    if run_dir is None or os.environ.get("RANK", "0") != "0":
        return None
    return RunLock(run_dir).acquire()


def _read(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        seen = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (seen.st_dev, seen.st_ino) == (mine.st_dev, mine.st_ino)
