"""Where amt-search keeps its per-host state (the embedded PostgreSQL, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$AMT_HOME``, else ``~/.local/state/amt-search``; created on first use."""
    home = os.environ.get("AMT_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".local" / "state" / "amt-search"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from storage.errors import StorageError

        raise StorageError(f"cannot use {path} as the state directory ($AMT_HOME): "
                           f"{e.strerror} — set AMT_HOME to a writable directory") from None
    return path.resolve()
