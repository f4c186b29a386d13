"""Errors about where things are stored; the CLIs print them as one line and exit 2."""


class StorageError(RuntimeError):
    """The study storage cannot be opened or used; the message says which and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match its SHA-256 manifest."""


def os_error_in(error: BaseException) -> OSError | None:
    """The first OSError among ``error`` and what caused it (``__cause__``/``__context__``):
    torch, for one, reports a failed write as a RuntimeError with the OSError behind it."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
