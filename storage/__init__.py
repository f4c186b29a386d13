"""Everything that persists: the Optuna study storage (PostgreSQL, embedded or not) and the
checkpoint store with its SHA-256 manifest.

Names are imported lazily, so that ``import storage.checkpoints`` (the trainer's only use)
does not load Optuna or SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    from storage.rdb import create_schema, open_storage
    from storage.urls import mask_url, resolve_url

__all__ = [
    "CheckpointError",
    "StorageError",
    "create_schema",
    "mask_url",
    "open_storage",
    "resolve_url",
]
_LAZY = {
    "open_storage": "storage.rdb",
    "create_schema": "storage.rdb",
    "mask_url": "storage.urls",
    "resolve_url": "storage.urls",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
