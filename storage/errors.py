"""Errors about where things are stored; the CLIs print them as one line and exit 2."""

from __future__ import annotations

import errno
from collections.abc import Iterator


class StorageError(RuntimeError):
    """The study storage cannot be opened or used; the message says which and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match its SHA-256 manifest."""


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        yield cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def os_error_in(error: BaseException) -> OSError | None:
    """The first OSError among ``error`` and what caused it (``__cause__``/``__context__``):
    torch, for one, reports a failed write as a RuntimeError with the OSError behind it."""
    return next((e for e in error_chain(error) if isinstance(e, OSError)), None)


# writes the file system refuses, whatever the file: every later write would fail the same
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def write_hint(error: OSError) -> str:
    """What to do about a write the file system refused ("" for other errors)."""
    return {
        errno.ENOSPC: ": free disk space",
        errno.EDQUOT: ": the disk quota is used up; free space",
        errno.EFBIG: ": a file grew past the file-size limit (ulimit -f, or a FAT/exFAT file "
                     "system's 4 GB); raise the limit or put the runs on another file system",
        errno.EROFS: ": remount it writable or put the runs on another file system",
    }.get(error.errno or 0, "")
