"""``prepare(data_cfg)``: corpus -> tokenizer -> tokenised splits, cached on disk and in-process.

On disk (``data.cache_dir`` or ``<state dir>/cache``), keyed by content hash:
``tokenizer-<hash>.json`` (training text + settings) and ``tokens-<hash>.npz`` (the tokenizer +
every pair of every split, untruncated). Truncation and ``max_train_pairs`` are applied
in memory, so changing them reuses both files. In-process, the result is memoised per
config (and the files' size and mtime), so a worker running many trials prepares once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from tokenizers import Tokenizer

from trainer.config import DataConfig
from trainer.data import tokenizer as tok
from trainer.data.batching import (
    Batch,
    Example,
    Ragged,
    Split,
    iter_batches,
    padding_fraction,
    plan_batches,
)
from trainer.data.cache import cache_root, load_or_build
from trainer.data.corpus import (
    SPLITS,
    Corpus,
    bible_db_path,
    clean_text,
    load_corpus,
    subset_pairs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PreparedData:
    train: Split  # after max_train_pairs
    val: Split
    test: Split
    tokenizer: Tokenizer = field(repr=False)  # its repr holds the whole vocabulary
    pad_id: int
    sep_id: int
    eos_id: int
    vocab_size: int  # the tokenizer's real size (<= data.vocab_size on a small corpus)
    fingerprint: str  # content hash of tokenizer + corpus, for logs and run metadata
    tokenizer_key: str  # hash of the tokenizer's training text and settings (its identity)
    prepare_s: float  # wall time of the prepare() call that built this
    built: tuple[str, ...]  # cache files this call had to build ("tokenizer", "tokens")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned like the corpus), without special tokens."""
        return list(self.tokenizer.encode(clean_text(text)).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first ``<eos>``; other special tokens are dropped.

        Accepts a list or a 1-D tensor/array; ids outside the vocabulary are ignored.
        """
        seq = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.eos_id in seq:
            seq = seq[: seq.index(self.eos_id)]
        return str(self.tokenizer.decode([i for i in seq if 0 <= i < self.vocab_size]))

    def batches(
        self, examples: Sequence[Example], tokens_per_batch: int, *,
        shuffle: bool, seed: int, epoch: int, start_batch: int = 0,
    ) -> Iterator[Batch]:
        """Token-budget batches of ``examples`` (a Split, or any sequence of Examples).

        Deterministic given ``(seed, epoch)``; ``start_batch`` skips that many batches of the
        same plan (a resumed run). ``B * T <= tokens_per_batch`` for every batch, except that
        an example longer than the budget comes alone.
        """
        return iter_batches(
            _as_split(examples), tokens_per_batch, self.pad_id, self.sep_id, self.eos_id,
            shuffle=shuffle, seed=seed, epoch=epoch, start_batch=start_batch,
        )

    def len_batches(
        self, examples: Sequence[Example], tokens_per_batch: int, *,
        shuffle: bool = True, seed: int = 0, epoch: int = 0,
    ) -> int:
        """Exact number of batches ``batches`` yields for this epoch (varies a little by epoch)."""
        lens = _as_split(examples).seq_lens
        return len(plan_batches(lens, tokens_per_batch, shuffle=shuffle, seed=seed, epoch=epoch))

    def padding_fraction(
        self, examples: Sequence[Example], tokens_per_batch: int, *,
        shuffle: bool = True, seed: int = 0, epoch: int = 0,
    ) -> float:
        """Share of ``B * T`` that is padding over one epoch of ``batches``."""
        lens = _as_split(examples).seq_lens
        plan = plan_batches(lens, tokens_per_batch, shuffle=shuffle, seed=seed, epoch=epoch)
        return padding_fraction(lens, plan)


_MEMO: dict[tuple[object, ...], PreparedData] = {}
_MEMO_SIZE = 4  # configs kept in memory (a search over vocab_size must not grow without bound)


def prepare(data_cfg: DataConfig) -> PreparedData:
    """Read, split and tokenise the corpus ``data_cfg`` names; reuse every cache that fits.

    Raises:
        ConfigError: the corpus cannot be read (see ``trainer.data.corpus.load_corpus``).
        OSError: the cache directory cannot be written.
    """
    memo_key = (data_cfg, *_source_stamps(data_cfg))
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    started = time.perf_counter()
    corpus = load_corpus(data_cfg)
    root = cache_root(data_cfg)
    train_texts = [src for src, _ in corpus.train] + [tgt for _, tgt in corpus.train]
    tokenizer, tok_key, trained = tok.load_or_train(train_texts, data_cfg.vocab_size, root)
    # "specials-as-text": '<eos>' in the corpus is encoded as text (tokens cached before were not)
    ids_key = hashlib.sha256(
        f"{tok_key}\n{corpus.fingerprint}\nspecials-as-text".encode()).hexdigest()
    arrays, encoded = load_or_build(
        root / f"tokens-{ids_key[:32]}.npz",
        _load_npz,
        functools.partial(_encode_corpus, tokenizer=tokenizer, corpus=corpus),
    )
    splits = {name: _split(arrays, name, corpus, data_cfg, tokenizer) for name in SPLITS}
    keep = np.asarray(subset_pairs(corpus.train, data_cfg.max_train_pairs), dtype=np.int64)
    data = PreparedData(
        train=splits["train"].take(keep),
        val=splits["val"],
        test=splits["test"],
        tokenizer=tokenizer,
        pad_id=tok.SPECIAL_TOKENS.index(tok.PAD),
        sep_id=tok.SPECIAL_TOKENS.index(tok.SEP),
        eos_id=tok.SPECIAL_TOKENS.index(tok.EOS),
        vocab_size=tokenizer.get_vocab_size(),
        fingerprint=ids_key,
        tokenizer_key=tok_key,
        prepare_s=time.perf_counter() - started,
        built=tuple(name for name, b in (("tokenizer", trained), ("tokens", encoded)) if b),
    )
    log.info(
        "data: %d/%d/%d train/val/test pairs, vocab %d, %.1fs%s",
        len(data.train), len(data.val), len(data.test), data.vocab_size, data.prepare_s,
        f" (built {', '.join(data.built)})" if data.built else " (cached)",
    )
    _warn_cut(arrays, data_cfg)
    _warn_rare(arrays, data_cfg)
    _MEMO[memo_key] = data
    while len(_MEMO) > _MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]  # the oldest
    return data


CUT_WARN = 0.2  # of the training pairs (the quickstart cuts 15 % of its French targets)


def _warn_cut(arrays: dict[str, np.ndarray], cfg: DataConfig) -> None:
    """Warn when many training pairs are longer than ``data.max_src_tokens`` /
    ``max_tgt_tokens`` (scripts of many bytes per character, a small vocabulary): they are
    cut, the model never sees their ends, and BLEU-4 is capped."""
    cut = {side: float(np.mean(arrays[f"train_{side}_len"] > limit)) if
           len(arrays[f"train_{side}_len"]) else 0.0
           for side, limit in (("src", cfg.max_src_tokens), ("tgt", cfg.max_tgt_tokens))}
    if max(cut.values()) > CUT_WARN:
        log.warning(
            "data: %.0f %% of the training sources are longer than data.max_src_tokens=%d and "
            "%.0f %% of the targets than data.max_tgt_tokens=%d; they are cut, which caps "
            "BLEU-4: raise those limits (and model.max_len) or data.vocab_size",
            100 * cut["src"], cfg.max_src_tokens, 100 * cut["tgt"], cfg.max_tgt_tokens)


RARE_COUNT = 5  # a token seen fewer times in training is one the model barely learns
RARE_WARN = 0.2  # of a side's training tokens (the Bible: under 1 %; unspaced text at a
# vocabulary too large for the corpus, where merges make rare chunks: 45 %, BLEU-4 0)


def _warn_rare(arrays: dict[str, np.ndarray], cfg: DataConfig) -> None:
    """Warn when many training tokens are of types seen fewer than RARE_COUNT times: a
    vocabulary too large for the corpus (scripts without spaces merge into whole phrases)."""
    common = 0
    shares = {}
    for side in ("src", "tgt"):
        ids = arrays[f"train_{side}_ids"]
        if not len(ids):
            return
        counts = np.bincount(ids)
        shares[side] = float(np.mean(counts[ids] < RARE_COUNT))
        common = max(common, int(np.sum(counts >= RARE_COUNT)))
    side = max(shares, key=lambda k: shares[k])
    if shares[side] > RARE_WARN:
        suggest = max(100, -(-2 * common // 100) * 100)
        log.warning(
            "data: %.0f %% of the training %s' tokens are pieces seen fewer than %d times "
            "(data.vocab_size=%d is large for this corpus; text without spaces merges into "
            "rare chunks): the model can hardly learn them and BLEU-4 stays low; try "
            "data.vocab_size=%d", 100 * shares[side],
            "targets" if side == "tgt" else "sources", RARE_COUNT, cfg.vocab_size, suggest)


def clear_memo() -> None:
    """Forget in-process results (the next ``prepare`` reads the disk cache again)."""
    _MEMO.clear()


def _as_split(examples: Sequence[Example]) -> Split:
    return examples if isinstance(examples, Split) else Split.from_examples(examples)


def _source_stamps(cfg: DataConfig) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every input file, so an edited file is read again."""
    if cfg.source == "bible":
        paths = [bible_db_path()]
    else:
        named = (cfg.path, cfg.train_path, cfg.val_path, cfg.test_path)
        paths = [Path(p).expanduser() for p in named if p]
    stamps = []
    for p in paths:
        try:
            st = p.stat()
            stamps.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((str(p), -1, -1))  # load_corpus reports it
    return stamps


def _encode_corpus(f: IO[bytes], tokenizer: Tokenizer, corpus: Corpus) -> None:
    arrays = {}
    for name in SPLITS:
        pairs = corpus.split(name)
        for side, texts in (("src", [s for s, _ in pairs]), ("tgt", [t for _, t in pairs])):
            rows = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
            ragged = Ragged.from_rows(rows)
            arrays[f"{name}_{side}_ids"] = ragged.flat
            arrays[f"{name}_{side}_len"] = ragged.length
    np.savez(f, **arrays)  # type: ignore[arg-type]


def _truncate(ragged: Ragged, max_len: int, tokenizer: Tokenizer) -> Ragged:
    """Rows cut to ``max_len`` tokens, and back to the last whole character: a byte-level
    token can hold part of a multi-byte character (CJK, Devanagari ...), and a target cut
    inside one would teach the model to write broken UTF-8 before ``<eos>``."""
    length = np.minimum(ragged.length, max_len)
    for i in np.flatnonzero(ragged.length > max_len):
        row = ragged.flat[ragged.start[i]: ragged.start[i] + length[i]].tolist()
        while len(row) > 1 and tokenizer.decode(row).endswith("\ufffd"):
            row.pop()
        length[i] = len(row)
    return Ragged(ragged.flat, ragged.start, length)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _split(arrays: dict[str, np.ndarray], name: str, corpus: Corpus, cfg: DataConfig,
           tokenizer: Tokenizer) -> Split:
    pairs = corpus.split(name)
    sides = []
    for side, max_len in (("src", cfg.max_src_tokens), ("tgt", cfg.max_tgt_tokens)):
        ragged = Ragged.from_lengths(arrays[f"{name}_{side}_ids"], arrays[f"{name}_{side}_len"])
        sides.append(_truncate(ragged, max_len, tokenizer))
    return Split(sides[0], sides[1], [s for s, _ in pairs], [t for _, t in pairs])

