"""Errors the user can fix; ``amt-search`` prints them as one line and exits 2."""


class SearchError(RuntimeError):
    """A user error about a study or trial (unknown study, unknown trial number ...)."""
