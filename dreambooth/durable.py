"""Files that a later run trusts: written whole or not at all, and on disk before anyone is told they exist.

A write to a temporary name renamed into place survives a killed process: readers see the old file or the new
one. Surviving a power loss takes two fsyncs more: the file's before the rename (else the rename can reach the
disk before the data, leaving an empty or zero-filled file under the final name) and its directory's after
(else the rename itself can be lost). Everything here works on the job's shared storage (local disks, NFS).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path


def write_file(path: Path, data: bytes | str | Iterable[bytes]) -> None:
    """Replace `path` with `data` (or its chunks, written as they come), atomically and durably."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique: writers on several nodes
    chunks = [data.encode()] if isinstance(data, str) else [data] if isinstance(data, bytes) else data
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def sync_file(path: Path) -> None:
    """Flush a file written by someone else's `open` (torch.save, PIL, safetensors) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Every file and directory under `root`, and `root` itself, on disk: before a rename publishes it."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            # A file gone meanwhile is another process's temporary one, renamed (that process syncs its own).
            with contextlib.suppress(FileNotFoundError):
                sync_file(Path(directory, name))
        sync_dir(Path(directory))
