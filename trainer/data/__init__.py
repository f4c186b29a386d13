"""The data pipeline: parallel corpora, splits, the subword tokenizer, token-budget batches.

``prepare(cfg.data)`` returns a :class:`PreparedData` with ``train`` / ``val`` / ``test``
splits of :class:`Example` and ``batches(...)`` yielding :class:`Batch` for the prefix LM
``source <sep> target <eos>`` (loss on target tokens and ``<eos>`` only).
``python -m trainer.data --help`` lists the Bible translations and exports corpora to TSV.
"""

from trainer.data.batching import IGNORE_INDEX, Batch, Example, Split
from trainer.data.corpus import (
    BibleTranslation,
    Corpus,
    bible_translations,
    check_corpus,
    describe_corpus,
    export_tsv,
    load_corpus,
)
from trainer.data.prepared import PreparedData, clear_memo, prepare

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BibleTranslation",
    "Corpus",
    "Example",
    "PreparedData",
    "Split",
    "bible_translations",
    "check_corpus",
    "clear_memo",
    "describe_corpus",
    "export_tsv",
    "load_corpus",
    "prepare",
]
