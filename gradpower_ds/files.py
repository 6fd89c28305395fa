"""Writing files so that no reader (another rank, a crash-resume, a monitoring tool) ever sees half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Opens a temp file beside `path` for binary writing; on success it replaces `path`, on error it is removed.

    Concurrent writers of the same content are safe too (each has its own temp file; the last replace wins).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, value: dict) -> None:
    """Writes `value` as indented JSON through atomic_open (a reader never sees half a file)."""
    with atomic_open(path) as f:
        f.write((json.dumps(value, indent=2) + "\n").encode())
