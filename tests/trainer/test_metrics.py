"""BLEU-4 (sacrebleu) and our NDD."""

from __future__ import annotations

import pytest

from trainer.errors import ConfigError
from trainer.metrics import auto_tokenize, bleu, levenshtein, ndd, resolve_tokenize


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


@pytest.mark.parametrize(("text", "expected"), [
    ("Au commencement, Dieu créa les cieux et la terre.", "13a"),
    ("В начале сотворил Бог небо и землю.", "13a"),
    ("태초에 하나님이 천지를 창조하시니라", "13a"),
    ("起初， 神创造天地。", "zh"),
    # Chinese mixed with Latin words (a tenth of the letters Han): zh, which scores the Latin
    # part as 13a does
    ("我们用 PyTorch 训练 the translation model with RoPE and GELU", "zh"),
    ("初めに、神が天と地を創造した。", "char"),
    ("ในปฐมกาลพระเจ้าทรงเนรมิตสร้างฟ้าและแผ่นดินโลก", "char"),
    # spaces between phrases, not words: short "words", still scored by character
    ("ในปฐมกาล พระเจ้าทรงเนรมิตสร้างฟ้าและแผ่นดิน", "char"),
    ("នៅដើមដំបូង ព្រះជាម្ចាស់បានបង្កើតផ្ទៃមេឃ និងផែនដី។", "char"),
    ("အစအဦး၌ ဘုရားသခင်သည် ကောင်းကင်နှင့် မြေကြီးကို ဖန်ဆင်းတော်မူ၏။", "char"),
    ("ໃນປະຖົມມະການ ພຣະເຈົ້າໄດ້ສ້າງ", "char"),
    ("आदि में परमेश्वर ने आकाश और पृथ्वी की सृष्टि की।", "13a"),
    ("", "13a"),
])
def test_auto_tokenize_picks_by_script(text: str, expected: str) -> None:
    assert auto_tokenize([text, text]) == expected


def test_cjk_references_score_with_their_tokeniser() -> None:
    # 13a sees each of these sentences as one word: a perfect translation scored 0 with it
    refs = ["初めに、神が天と地を創造した。", "ヤコブはラケルに怒りを燃やして言った。"]
    assert bleu(refs, refs)[0] == 0.0
    tokenize = resolve_tokenize("auto", refs)
    score, signature = bleu(refs, refs, tokenize)
    assert score == pytest.approx(100.0) and "tok:char" in signature
    # NDD counts the same units: one character of 15 missing
    assert ndd([refs[0][:-1]], [refs[0]], tokenize) == pytest.approx(1 / 15)


def test_unusable_tokeniser_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="bleu_tokenize='ja-mecab'.*pip install"):
        resolve_tokenize("ja-mecab", ["x"])
    assert resolve_tokenize("intl", ["x"]) == "intl"


def test_the_config_knows_sacrebleus_tokenisers() -> None:
    import sacrebleu

    from trainer.config import TOKENIZE_CHOICES

    assert set(TOKENIZE_CHOICES) == {"auto", *sacrebleu.BLEU.TOKENIZERS}


def test_a_whitespace_tokenizer_named_for_japanese_warns(caplog: pytest.LogCaptureFixture) -> None:
    from trainer.metrics import resolve_tokenize

    refs = ["初めに、神は天地を創造された。", "地は混沌であった。"]
    assert resolve_tokenize("13a", refs) == "13a"  # kept: the user named it
    assert "written without spaces between words" in caplog.text and "pick char" in caplog.text
    caplog.clear()
    assert resolve_tokenize("13a", ["In the beginning God created the heavens."]) == "13a"
    assert resolve_tokenize("auto", refs) == "char"
    assert "without spaces" not in caplog.text
