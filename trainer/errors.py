"""Errors the user can fix. The CLIs print them as one line and exit 2; anything else is a bug."""


class ConfigError(ValueError):
    """A bad config file, key, value, data file or CLI argument; the message names it."""


class TrainingFailed(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory at the smallest micro-batch).

    ``reason`` is a short machine-readable tag ("nan_loss", "oom"); ``retryable`` says whether
    running the same trial again could help.
    """

    def __init__(self, message: str, reason: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
