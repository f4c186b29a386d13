"""BLEU-4 (sacrebleu) and our NDD."""

from __future__ import annotations

import pytest

from trainer.metrics import bleu, levenshtein, ndd


def test_bleu_is_sacrebleu_corpus_bleu_on_0_100() -> None:
    refs = ["the cat sat on the mat today", "a dog barked at the moon"]
    score, signature = bleu(refs, refs)
    assert score == pytest.approx(100.0)
    assert "tok:13a" in signature and "nrefs:1" in signature
    assert bleu(["completely different words here now"] * 2, refs)[0] < 5


def test_levenshtein() -> None:
    assert levenshtein(list("kitten"), list("sitting")) == 3
    assert levenshtein([], ["a", "b"]) == 2


def test_ndd_is_normalised_word_edit_distance() -> None:
    assert ndd(["a b c", "x"], ["a b c", "x"]) == 0.0
    # one substitution in 4 words, one deletion against 2 words: (1 + 1) / (4 + 2)
    assert ndd(["a b c d", "x"], ["a b e d", "x y"]) == pytest.approx(2 / 6)
    assert ndd(["", ""], ["", ""]) == 0.0
