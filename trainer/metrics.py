"""Translation metrics on detokenised text.

BLEU-4 is sacrebleu's corpus BLEU with its default settings (exp smoothing, case-sensitive)
on the 0-100 scale: Report 03's 0.393 is 39.3 here. The tokenisation is ``eval.bleu_tokenize``:
``auto`` (the default) picks sacrebleu's ``13a`` for languages written with spaces between
words, ``zh`` for Chinese and ``char`` for Japanese and other scripts written without spaces
(13a would see a whole sentence as one word there, and even a perfect translation of a short
sentence scores 0); see ``auto_tokenize``. The signature (e.g.
``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) is returned with the score so
logs and results say exactly what was computed.

NDD. Report 03 lists an "NDD" column (0.027-0.034, lower is better) without defining it. We
define it as the corpus-level *normalised word edit distance*:
``sum_i lev(hyp_i, ref_i) / sum_i max(|hyp_i|, |ref_i|)`` over the words of BLEU-4's tokeniser,
in [0, 1], 0 when every hypothesis equals its reference. It is not comparable with the
report's numbers (which are unknowable); it is a cheap second view next to BLEU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import sacrebleu

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["bleu", "ndd", "levenshtein", "auto_tokenize", "resolve_tokenize", "TOKENIZE_CHOICES"]

# "auto" and sacrebleu's own tokenisers (ja-mecab / ko-mecab need sacrebleu[ja] / [ko]; spm and
# flores download a SentencePiece model on first use)
TOKENIZE_CHOICES = ("auto", *sacrebleu.BLEU.TOKENIZERS)


def _metric(tokenize: str) -> sacrebleu.BLEU:
    try:
        return sacrebleu.BLEU(tokenize=tokenize)
    except Exception as e:  # missing extras (MeCab), no network for a SentencePiece model
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        hint = " ".join(ln.strip() for ln in str(e).splitlines() if "pip install" in ln)
        raise ConfigError(f"eval.bleu_tokenize={tokenize!r}: {first}"
                         + (f" ({hint})" if hint else "")) from None


def bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a"
         ) -> tuple[float, str]:
    """Corpus BLEU-4 (0-100) and the sacrebleu signature, with sacrebleu's ``tokenize``."""
    metric = _metric(tokenize)
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def _is_kana(o: int) -> bool:
    return 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F


def _is_han(o: int) -> bool:
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
            or 0x20000 <= o <= 0x2FA1F)


def _is_unspaced(o: int) -> bool:
    """Thai, Lao, Myanmar (Burmese), Khmer: scripts written without spaces between words
    (their spaces part phrases, so word length alone does not tell them apart)."""
    return 0x0E00 <= o <= 0x0EFF or 0x1000 <= o <= 0x109F or 0x1780 <= o <= 0x17FF


def auto_tokenize(references: Iterable[str]) -> str:
    """sacrebleu's tokeniser for these reference texts: ``char`` when kana make up 5 % of the
    letters (Japanese; WMT's ``ja-mecab`` needs MeCab, which is not installed by default),
    ``zh`` when Han characters make up 10 % (Chinese, also mixed with Latin text: ``zh``
    tokenises the rest as ``13a`` does), ``char`` when Thai, Lao, Burmese or
    Khmer letters make up 30 %, or when words run longer than 12 letters between spaces on
    average (other scripts written without spaces), else ``13a``."""
    letters = kana = han = unspaced = words = 0
    for text in references:
        words += len(text.split())
        for ch in text:
            if ch.isalpha():
                letters += 1
                o = ord(ch)
                kana += _is_kana(o)
                han += _is_han(o)
                unspaced += _is_unspaced(o)
    if not letters:
        return "13a"
    if kana >= 0.05 * letters:
        return "char"
    if han >= 0.1 * letters:
        return "zh"
    if unspaced >= 0.3 * letters:
        return "char"
    if letters > 12 * max(words, 1):
        return "char"
    return "13a"


def resolve_tokenize(setting: str, references: Iterable[str]) -> str:
    """``setting`` itself, checked to work here, or ``auto_tokenize(references)``. A
    whitespace tokeniser named for references written without spaces (Chinese, Japanese, Thai
    ...) is kept, with a warning: BLEU-4 would be near 0 whatever the model does."""
    if setting == "auto":
        name = auto_tokenize(references)
    else:
        name = setting
        refs = list(references)
        auto = auto_tokenize(refs) if refs else "13a"
        if name in ("13a", "intl", "none") and auto in ("zh", "char"):
            log.warning("eval.bleu_tokenize is %s but the references are written without spaces "
                        "between words: BLEU-4 counts whole sentences as words and stays near 0 "
                        "(auto would pick %s)", name, auto)
    _metric(name)
    return name


def levenshtein(a: list[str], b: list[str]) -> int:
    """Edit distance (insertions, deletions, substitutions of whole items)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def ndd(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> float:
    """Normalised word edit distance of the corpus (see the module docstring), over the words
    of sacrebleu's ``tokenize`` (as BLEU-4 sees them)."""
    split = _metric(tokenize).tokenizer
    distance = total = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = split(hyp).split(), split(ref).split()
        distance += levenshtein(h, r)
        total += max(len(h), len(r))
    return distance / total if total else 0.0
