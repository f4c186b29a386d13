"""Fixtures for the search tests: real PostgreSQL (fresh databases), a private ``$AMT_HOME``,
and a tiny search over a synthetic corpus that a 2-layer, d=32..64 model learns in 40 steps.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.storage.conftest import new_database  # noqa: F401  (fixture)
from tests.trainer.synthetic import write_task

REPO = Path(__file__).resolve().parents[2]

def write_corpus(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Word-for-word translation of 2-4 of 6 made-up words, the target prefixed with "the":
    BLEU-4 rises within a few dozen steps, and differently for different settings."""
    return write_task(path, n, seed, n_words=6, lengths=(2, 4), target_prefix="the ")


def tiny_train(tmp: Path) -> dict[str, object]:
    """The 'full-run recipe' of the tiny search: 60 steps."""
    return {
        "name": "tiny",
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "max_len": 32,
                  "norm": "pre", "dropout": 0.0, "drop_path": 0.0},
        "data": {"source": "tsv", "path": str(write_corpus(tmp / "corpus.tsv")),
                 "vocab_size": 300, "max_src_tokens": 12, "max_tgt_tokens": 12,
                 "val_fraction": 0.1, "test_fraction": 0.05, "cache_dir": str(tmp / "cache")},
        "optim": {"lr": 3.0e-3, "warmup": 0.1, "label_smoothing": 0.1},
        "train": {"tokens_per_batch": 512, "grad_accum": 1, "max_steps": 60, "eval_every": 20,
                  "eval_subset": 16, "eval_max_new_tokens": 24, "ema_decay": 0.0,
                  "early_stopping_patience": 0, "out_dir": str(tmp / "runs" / "default")},
    }


def tiny_search(name: str = "tiny", n_trials: int = 8) -> dict[str, object]:
    """40-step trials, an eval every 8 steps; the report's three trials, scaled, first."""
    return {
        "name": name,
        "base_config": "train.yaml",
        "truncation": {"max_steps": 40, "eval_every": 8, "eval_subset": 16, "warmup": 0.1},
        "sampler": {"seed": 1, "n_startup_trials": 3},
        "pruner": {"type": "hyperband", "min_resource": 1, "reduction_factor": 2},
        "derive": {"head_dim": 16, "ffn_ratio": 2},
        "space": {
            "model.n_layers": {"type": "int", "low": 1, "high": 2},
            "model.d_model": {"type": "categorical", "choices": [32, 64]},
            "optim.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
        },
        "enqueue": [
            {"model.n_layers": 2, "model.d_model": 64, "optim.lr": 3.0e-3},
            {"model.n_layers": 2, "model.d_model": 32, "optim.lr": 1.0e-3},
            {"model.n_layers": 1, "model.d_model": 64, "optim.lr": 1.0e-2},
        ],
        "n_trials": n_trials,
        "heartbeat_interval_s": 2,
        "grace_period_s": 10,
    }


@pytest.fixture
def write_search(tmp_path: Path) -> Callable[..., Path]:
    """Write train.yaml and search.yaml (``tiny_search`` updated with ``changes``) into
    tmp_path; returns the search.yaml path."""

    def write(**changes: object) -> Path:
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(tiny_train(tmp_path)))
        path = tmp_path / "search.yaml"
        path.write_text(yaml.safe_dump({**tiny_search(), **changes}, sort_keys=False))
        return path

    return write


@pytest.fixture
def storage_url(new_database: Callable[[], str], tmp_path: Path,  # noqa: F811
                monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database as ``$AMT_STORAGE_URL`` and a private ``$AMT_HOME`` for one test."""
    url = new_database()
    monkeypatch.setenv("AMT_STORAGE_URL", url)
    monkeypatch.setenv("AMT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AMT_PROGRESS", "0")
    yield url


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """``run_worker`` installs SIGTERM/SIGINT handlers; put the test runner's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    if cuda is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda
