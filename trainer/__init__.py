"""Train and evaluate one AMT decoder: ``fit(cfg, callbacks=()) -> FitResult``.

``trainer`` never imports ``search`` or ``optuna``; pruning reaches it through callbacks.
Importing this package is cheap: the training loop (and torch) load on first use of ``fit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.config import TrainConfig

if TYPE_CHECKING:
    from trainer.loop import FitResult, Run, fit

__all__ = ["FitResult", "Run", "TrainConfig", "fit"]


def __getattr__(name: str) -> Any:
    if name in ("fit", "FitResult", "Run"):
        from trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
