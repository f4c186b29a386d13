"""Atomic file writes, shared by the checkpoint store and the trainer's data cache."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "fsync_dir", "starts_with"]

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only read by setting)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], mode: int | None = None) -> None:
    """Write ``path`` through a temporary file in its directory: write, fsync, rename, fsync
    the directory. The temporary file is named ``.<name>.<pid>.<random>.tmp`` so that a
    reader can tell a dead writer's leftovers. On any failure (disk full included) the
    temporary file is removed and ``path`` is untouched. ``mode``: the file's permissions
    (default: 0666 less the umask, as ``open`` gives; mkstemp alone would give 0600)."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK if mode is None else mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = str(path)  # name the file meant, not the temporary one (or none)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file ``path`` begins with ``prefix``, reading only that much (a file the
    user named may be anything: huge, a device)."""
    with path.open("rb") as f:
        return f.read(len(prefix)) == prefix
