"""Writing files so that no reader (another rank, a crash-resume, a monitoring tool) ever sees half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, opened for writing, with the mode open() would give it (0666 less the umask).

    tempfile.mkstemp would make it 0600, and os.replace keeps that mode: run files would be private
    while metrics.csv (written with open()) is not.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Opens a temp file beside `path` for binary writing; on success it replaces `path`, on error it is removed.

    The file gets the mode open() gives new files (0666 less the umask, typically 0644).
    Concurrent writers of the same content are safe too (each has its own temp file; the last replace wins).
    """
    path = Path(path)
    fd, tmp = _create_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_bytes(value: dict, size: int = 0) -> bytes:
    """`value` as indented JSON and a newline, padded with spaces before the newline to `size` bytes where it is
    shorter (still valid JSON): a file that always takes `size` bytes can be rewritten in place (see
    overwrite_json_in_place)."""
    text = json.dumps(value, indent=2).encode()
    return text + b" " * (size - len(text) - 1) + b"\n"


def write_json(path: str | Path, value: dict, size: int = 0) -> None:
    """Writes `value` as indented JSON (json_bytes, padded to `size` bytes) through atomic_open (a reader never
    sees half a file)."""
    with atomic_open(path) as f:
        f.write(json_bytes(value, size))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a full filesystem or an exhausted quota (ENOSPC, EDQUOT)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def overwrite_json_in_place(path: str | Path, value: dict, size: int) -> None:
    """Writes `value` (json_bytes, padded to `size` bytes or to the file's size where that is larger) over the
    existing file `path`, without a temp file and without truncating it: for when the disk is full and
    write_json's temp file cannot be written. Overwriting bytes a file already has needs no new blocks on
    ordinary filesystems (ext4, xfs, tmpfs, NFS), so this works on a full disk when the file already holds
    `size` bytes; copy-on-write filesystems (btrfs, ZFS) need new blocks for it too. Not atomic: a reader at that
    moment can see a mix of old and new bytes."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        data = memoryview(json_bytes(value, max(size, os.fstat(fd).st_size)))
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
    finally:
        os.close(fd)
