"""The on-disk data cache: files named by content hash, built by one process, written atomically.

Several workers on one host may ask for the same file at once: one takes an exclusive
``fcntl.flock`` on ``<file>.lock`` and builds it, the others wait on the lock and then read
the finished file. Files appear by ``os.replace`` of a fully written temp file, so a reader
never sees half a file; a file that cannot be loaded anyway (a disk fault, a killed
``cp``) is rebuilt once.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

from storage.files import atomic_write
from trainer.config import DataConfig

T = TypeVar("T")
log = logging.getLogger(__name__)


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``<state dir>/cache`` (``$AMT_HOME`` or ~/.local/state/...)."""
    if cfg.cache_dir:
        root = Path(cfg.cache_dir).expanduser()
    else:
        from storage.paths import state_dir

        root = state_dir() / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_or_build(
    path: Path, load: Callable[[Path], T], build: Callable[[IO[bytes]], object]
) -> tuple[T, bool]:
    """Load ``path``, building it first (once per host) if it is missing or unreadable.

    Returns the loaded value and whether this call built the file. An exception from
    ``build``, or from ``load`` on a file just built, propagates.
    """
    value = _try_load(path, load)
    if value is not None:
        return value, False
    with _locked(path.with_name(path.name + ".lock")):
        value = _try_load(path, load)  # another process may have built it while we waited
        if value is not None:
            return value, False
        atomic_write(path, build)
    return load(path), True


def _try_load(path: Path, load: Callable[[Path], T]) -> T | None:
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as e:  # any reader error means the file is unusable: rebuild it
        log.warning("cache file %s is unreadable (%s); rebuilding it", path, e)
        return None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
