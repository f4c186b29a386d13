"""Translation metrics on detokenised text.

BLEU-4 is sacrebleu's corpus BLEU with its default settings (13a tokenisation, exp
smoothing, case-sensitive) on the 0-100 scale: Report 03's 0.393 is 39.3 here. The
signature (e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1``) is returned
with the score so logs and results say exactly what was computed.

NDD. Report 03 lists an "NDD" column (0.027-0.034, lower is better) without defining it. We
define it as the corpus-level *normalised word edit distance*:
``sum_i lev(hyp_i, ref_i) / sum_i max(|hyp_i|, |ref_i|)`` over whitespace-separated words,
in [0, 1], 0 when every hypothesis equals its reference. It is not comparable with the
report's numbers (which are unknowable); it is a cheap second view next to BLEU.
"""

from __future__ import annotations

import sacrebleu

__all__ = ["bleu", "ndd", "levenshtein"]


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU-4 (0-100) and the sacrebleu signature."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


def levenshtein(a: list[str], b: list[str]) -> int:
    """Edit distance (insertions, deletions, substitutions of whole items)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def ndd(hypotheses: list[str], references: list[str]) -> float:
    """Normalised word edit distance of the corpus (see the module docstring)."""
    distance = total = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        distance += levenshtein(h, r)
        total += max(len(h), len(r))
    return distance / total if total else 0.0
