"""Writing a file so that no reader (another rank, a crash-resume, a monitoring tool) ever sees half of it."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, opened for writing, with the mode open() would give it (0666 less the umask).

    tempfile.mkstemp would make it 0600, and os.replace keeps that mode: run files would be private
    while files written with open() are not.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | Path, durable: bool = False) -> Iterator[BinaryIO]:
    """Opens a temp file beside `path` for binary writing; on success it replaces `path`, on error it is removed.

    The file gets the mode open() gives new files (0666 less the umask, typically 0644). Concurrent writers
    of the same content are safe too (each has its own temp file; the last replace wins). ``durable``
    also fsyncs the file before the replace, so after a power loss `path` holds the old or the new
    content, never an empty file (for checkpoint manifests and pointers).
    """
    path = Path(path)
    fd, tmp = _create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
