"""A small synthetic translation task and tiny configs for the trainer tests.

The task maps each of 12 made-up source words to one English word, word by word, 3-7 words
per sentence: learning it needs the prefix LM to align target position i with source
position i, which a copy of the source cannot fake (no source word is a target word, so
copying scores BLEU 0).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig, apply_overrides, config_from_dict

SRC_WORDS = ["ka", "lo", "mi", "ne", "pu", "ri", "sa", "tu", "vo", "we", "xi", "yo"]
TGT_WORDS = ["apple", "bird", "cloud", "door", "egg", "fish", "gate", "hill", "ink", "jar",
             "kite", "lamp"]


def write_task(
    path: Path,
    n: int = 800,
    seed: int = 0,
    *,
    n_words: int = len(SRC_WORDS),
    lengths: tuple[int, int] = (3, 7),
    target_prefix: str = "",
) -> Path:
    """Write ``n`` TSV pairs: the first ``n_words`` made-up words, ``lengths`` words per
    sentence, each translated word by word (the target optionally led by ``target_prefix``)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        idx = [rng.randrange(n_words) for _ in range(rng.randint(*lengths))]
        src = " ".join(SRC_WORDS[i] for i in idx)
        lines.append(f"{src}\t{target_prefix}{' '.join(TGT_WORDS[i] for i in idx)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(task: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    """A 2-layer d=32 model on ``task``: a step takes milliseconds on one CPU thread."""
    raw = {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_len": 64,
                  "norm": "pre", "dropout": 0.1, "drop_path": 0.1},
        "data": {"source": "tsv", "path": str(task), "vocab_size": 300, "max_src_tokens": 24,
                 "max_tgt_tokens": 24, "val_fraction": 0.1, "test_fraction": 0.05,
                 "cache_dir": str(task.parent / "cache")},
        "optim": {"lr": 3e-3, "warmup": 0.1, "label_smoothing": 0.1},
        "train": {"tokens_per_batch": 512, "grad_accum": 2, "max_steps": 12, "eval_every": 4,
                  "eval_subset": 8, "eval_max_new_tokens": 12, "ema_decay": 0.9,
                  "early_stopping_patience": 0, "out_dir": str(out_dir)},
    }
    return config_from_dict(apply_overrides(raw, overrides))
