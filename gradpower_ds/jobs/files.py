"""Writing the run folder's files so that no reader (another rank, a crash-resume, a monitoring tool) ever sees half
of one (``atomic_open``, the library's ``gradpower_ds.atomic_write``), and status.json even on a full disk."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..atomic_write import atomic_open

__all__ = ["atomic_open", "is_disk_full", "json_bytes", "overwrite_json_in_place", "write_json"]


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
