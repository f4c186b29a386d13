"""Errors about where things are stored; the CLIs print them as one line and exit 2."""


class StorageError(RuntimeError):
    """The study storage cannot be opened or used; the message says which and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match its SHA-256 manifest."""
