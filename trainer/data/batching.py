"""Tokenised splits and token-budget batches for the prefix LM ``src <sep> tgt <eos>``.

A :class:`Split` keeps every token id of a split in one flat array (plus start and length
per example), so 31k pairs cost a few MB and no Python objects until an example is read.

Batches are built by length bucketing: the examples are shuffled, cut into large chunks,
sorted by length within each chunk and packed greedily so that ``B * T_padded`` stays within
the token budget; then the batches are shuffled. Everything is drawn from one generator
seeded by ``(seed, epoch)``, so an epoch's batches are the same on every run and a resumed run
can skip to ``start_batch``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

IGNORE_INDEX = -100  # targets that carry no loss (source, <sep>'s own position, padding)
CHUNK_BATCHES = 64  # a sort chunk holds about this many batches' worth of examples


@dataclass(frozen=True)
class Example:
    src_ids: list[int]  # truncated to data.max_src_tokens
    tgt_ids: list[int]  # truncated to data.max_tgt_tokens
    src_text: str  # full text, never truncated
    tgt_text: str  # the reference for BLEU


@dataclass(frozen=True)
class Ragged:
    """Variable-length rows of token ids: row i is ``flat[start[i] : start[i] + length[i]]``."""

    flat: np.ndarray  # (total,) int32
    start: np.ndarray  # (n,) int64
    length: np.ndarray  # (n,) int64

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        length = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(length.sum()))
        return cls.from_lengths(flat, length)

    @classmethod
    def from_lengths(cls, flat: np.ndarray, length: np.ndarray) -> Ragged:
        """Rows stored back to back in ``flat``."""
        length = length.astype(np.int64)
        start = np.zeros(len(length), dtype=np.int64)
        np.cumsum(length[:-1], out=start[1:])
        return cls(flat, start, length)

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.start[i] : self.start[i] + self.length[i]]

    def take(self, index: np.ndarray) -> Ragged:
        return Ragged(self.flat, self.start[index], self.length[index])

    def truncate(self, max_len: int) -> Ragged:
        return Ragged(self.flat, self.start, np.minimum(self.length, max_len))


class Split(Sequence[Example]):
    """The examples of one split; ``split[i]`` is an :class:`Example`, a slice is a ``Split``."""

    def __init__(self, src: Ragged, tgt: Ragged, src_texts: list[str], tgt_texts: list[str]):
        assert len(src.length) == len(tgt.length) == len(src_texts) == len(tgt_texts)
        self.src, self.tgt = src, tgt
        self.src_texts, self.tgt_texts = src_texts, tgt_texts

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> Split:
        return cls(
            Ragged.from_rows([e.src_ids for e in examples]),
            Ragged.from_rows([e.tgt_ids for e in examples]),
            [e.src_text for e in examples],
            [e.tgt_text for e in examples],
        )

    def __len__(self) -> int:
        return len(self.src_texts)

    def __repr__(self) -> str:
        return f"Split({len(self)} examples)"

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> Split: ...

    def __getitem__(self, i: int | slice) -> Example | Split:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for a split of {len(self)}")
        i %= len(self)
        src_ids, tgt_ids = self.src.row(i).tolist(), self.tgt.row(i).tolist()
        return Example(src_ids, tgt_ids, self.src_texts[i], self.tgt_texts[i])

    def take(self, index: np.ndarray) -> Split:
        return Split(
            self.src.take(index), self.tgt.take(index),
            [self.src_texts[i] for i in index], [self.tgt_texts[i] for i in index],
        )

    @property
    def seq_lens(self) -> np.ndarray:
        """Length of each ``src <sep> tgt <eos>`` sequence, in tokens."""
        return self.src.length + self.tgt.length + 2


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # (B, T) long: src <sep> tgt <eos>, right-padded with pad_id
    prefix_lens: torch.Tensor  # (B,) long: len(src) + 1, the prefix the model sees whole
    targets: torch.Tensor  # (B, T) long: tokens[t + 1] where t predicts tgt or <eos>, else -100
    n_target_tokens: int  # positions with a target: sum of len(tgt) + 1
    n_tokens: int  # B * T, padding included
    example_ids: torch.Tensor  # (B,) long: index of each row's example in the split

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.tokens.to(device, non_blocking=non_blocking),
            self.prefix_lens.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.n_target_tokens,
            self.n_tokens,
            self.example_ids.to(device, non_blocking=non_blocking),
        )


def plan_batches(
    seq_lens: np.ndarray, tokens_per_batch: int, *, shuffle: bool, seed: int, epoch: int
) -> list[np.ndarray]:
    """Example indices of each batch of one epoch, in order.

    Every batch has ``len(batch) * max(seq_lens[batch]) <= tokens_per_batch``, except that an
    example longer than the budget gets a batch of its own.
    """
    n = len(seq_lens)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    chunk = max(1, int(CHUNK_BATCHES * tokens_per_batch / float(seq_lens.mean())))
    batches: list[np.ndarray] = []
    for chunk_start in range(0, n, chunk):
        index = order[chunk_start : chunk_start + chunk]
        index = index[np.argsort(seq_lens[index], kind="stable")]
        lens = seq_lens[index].tolist()
        first = 0
        for j, longest in enumerate(lens):  # ascending, so lens[j] is the batch's longest
            if j > first and (j - first + 1) * longest > tokens_per_batch:
                batches.append(index[first:j])
                first = j
        batches.append(index[first:])
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def make_batch(split: Split, index: np.ndarray, pad_id: int, sep_id: int, eos_id: int) -> Batch:
    src_lens, tgt_lens = split.src.length[index], split.tgt.length[index]
    n_rows, width = len(index), int((src_lens + tgt_lens).max()) + 2
    tokens = np.full((n_rows, width), pad_id, dtype=np.int64)
    targets = np.full((n_rows, width), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(index):
        ns, nt = int(src_lens[row]), int(tgt_lens[row])
        tokens[row, :ns] = split.src.row(i)
        tokens[row, ns] = sep_id
        tokens[row, ns + 1 : ns + 1 + nt] = split.tgt.row(i)
        tokens[row, ns + 1 + nt] = eos_id
        # position ns (<sep>) predicts tgt[0], ..., position ns + nt (last tgt) predicts <eos>
        targets[row, ns : ns + nt + 1] = tokens[row, ns + 1 : ns + nt + 2]
    return Batch(
        tokens=torch.from_numpy(tokens),
        prefix_lens=torch.from_numpy(src_lens + 1),
        targets=torch.from_numpy(targets),
        n_target_tokens=int((tgt_lens + 1).sum()),
        n_tokens=n_rows * width,
        example_ids=torch.from_numpy(index.astype(np.int64)),
    )


def iter_batches(
    split: Split, tokens_per_batch: int, pad_id: int, sep_id: int, eos_id: int, *,
    shuffle: bool, seed: int, epoch: int, start_batch: int = 0,
) -> Iterator[Batch]:
    plan = plan_batches(split.seq_lens, tokens_per_batch, shuffle=shuffle, seed=seed, epoch=epoch)
    for index in plan[start_batch:]:
        yield make_batch(split, index, pad_id, sep_id, eos_id)


def padding_fraction(seq_lens: np.ndarray, plan: list[np.ndarray]) -> float:
    """Share of the batches' ``B * T`` cells that are padding."""
    cells = sum(len(b) * int(seq_lens[b].max()) for b in plan)
    return 1.0 - float(seq_lens.sum()) / cells if cells else 0.0
