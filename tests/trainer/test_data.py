"""The data pipeline: corpora, splits, tokenizer, caches, batches, export.

The Bible tests share one cold ``prepare`` of English -> French (a few seconds) in a
temporary cache directory; the file-format tests use tiny corpora.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import re
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.config import DataConfig
from trainer.data import IGNORE_INDEX, Example, PreparedData, clear_memo, load_corpus, prepare
from trainer.data import __main__ as cli
from trainer.data import corpus as corpus_module
from trainer.data import tokenizer as tokenizer_module
from trainer.data.cache import load_or_build
from trainer.errors import ConfigError

BUDGET = 16384  # the report's tokens per GPU micro-batch


@pytest.fixture(scope="module")
def bible_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bible-cache")


@pytest.fixture(scope="module")
def bible(bible_cache: Path) -> PreparedData:
    clear_memo()
    return prepare(DataConfig(cache_dir=str(bible_cache)))


def tiny_pairs(n: int = 120) -> list[tuple[str, str]]:
    words = ["cat", "dog", "house", "tree", "water", "bread", "light", "night"]
    mots = ["chat", "chien", "maison", "arbre", "eau", "pain", "lumière", "nuit"]
    return [
        (f"the {words[i % 8]} number {i} is {words[(i * 3) % 8]}",
         f"le {mots[i % 8]} numéro {i} est {mots[(i * 3) % 8]}")
        for i in range(n)
    ]


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the Bible


def test_bible_splits_are_deterministic_and_chapter_disjoint() -> None:
    cfg = DataConfig()
    corpus = load_corpus(cfg)
    assert corpus == load_corpus(cfg)
    # every chapter must be one contiguous block of exactly one split (splits keep verse order)
    rows = corpus_module._bible_db().execute(
        "SELECT s.bNumber, s.cNumber, s.vText, t.vText FROM bible s JOIN bible t ON t.bbName='5'"
        " AND t.bNumber=s.bNumber AND t.cNumber=s.cNumber AND t.vNumber=s.vNumber"
        " WHERE s.bbName='4' ORDER BY s.bNumber, s.cNumber, s.vNumber"
    ).fetchall()
    verses: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for book, chapter, src, tgt in rows:
        pair = (corpus_module.clean_text(src), corpus_module.clean_text(tgt))
        verses.setdefault((book, chapter), []).append(pair)
    position = {"train": 0, "val": 0, "test": 0}
    chapters: dict[str, set[tuple[int, int]]] = {name: set() for name in position}
    for ref, block in verses.items():
        owners = [n for n, i in position.items() if corpus.split(n)[i : i + len(block)] == block]
        assert len(owners) == 1, (ref, owners)
        position[owners[0]] += len(block)
        chapters[owners[0]].add(ref)
    assert position == {n: len(corpus.split(n)) for n in position}  # every pair accounted for
    assert not chapters["train"] & chapters["val"]
    assert not chapters["train"] & chapters["test"]
    assert not chapters["val"] & chapters["test"]
    n_chapters = sum(len(c) for c in chapters.values())
    assert n_chapters == 1189
    for name in ("val", "test"):  # 2 % of 1189 chapters is 24; allow hashing noise
        assert 10 <= len(chapters[name]) <= 45, (name, len(chapters[name]))
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 31102


def test_bible_other_pair_and_unknown_translation() -> None:
    de_es = load_corpus(DataConfig(bible_src="s", bible_tgt="9"))
    assert len(de_es.train) > 29000
    assert de_es.train[0][0].startswith("Im Anfang")
    with pytest.raises(ConfigError, match=r"data.bible_tgt: unknown Bible translation 'x'.*5=FR"):
        load_corpus(DataConfig(bible_tgt="x"))
    with pytest.raises(ConfigError, match=r"'zh': did you mean 'c' \(ZH New Chinese"):
        load_corpus(DataConfig(bible_tgt="zh"))
    with pytest.raises(ConfigError, match=r"'C': did you mean 'c' .*case-sensitive"):
        load_corpus(DataConfig(bible_tgt="C"))


def test_prepare_bible_figures(bible: PreparedData) -> None:
    assert bible.built == ("tokenizer", "tokens")
    assert 29000 < len(bible.train) < 30500 and 300 < len(bible.val) < 1200
    assert bible.vocab_size == 16000
    assert (bible.pad_id, bible.sep_id, bible.eos_id) == (0, 1, 2)
    ex = bible.train[0]
    assert isinstance(ex, Example)
    assert ex.src_text == "In the beginning God created the heavens and the earth."
    assert bible.decode(ex.tgt_ids) == ex.tgt_text
    assert max(bible.train.src.length) <= 200 and max(bible.train.tgt.length) <= 200


def test_tokenizer_round_trips_corpus_text(bible: PreparedData) -> None:
    texts = bible.val.src_texts + bible.val.tgt_texts + bible.train.tgt_texts[:2000]
    exact = sum(bible.decode(bible.encode(t)) == t for t in texts)
    assert exact == len(texts)  # byte-level BPE is lossless on cleaned text
    ids = bible.encode("Et Dieu dit : Que la lumière soit.") + [bible.eos_id, 99, 98]
    assert bible.decode(ids) == "Et Dieu dit : Que la lumière soit."  # stops at <eos>


def test_second_prepare_hits_the_disk_cache(
    bible: PreparedData, bible_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(cache_dir=str(bible_cache))
    assert prepare(cfg) is bible  # memoised in-process
    clear_memo()

    def no_training(*args: object) -> None:
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizer_module, "train", no_training)
    warm = prepare(cfg)
    assert warm.built == ()
    assert warm.prepare_s < bible.prepare_s / 2, (warm.prepare_s, bible.prepare_s)
    assert warm.fingerprint == bible.fingerprint
    assert np.array_equal(warm.train.tgt.flat, bible.train.tgt.flat)
    # truncation and the subset are applied in memory: same cache files
    small = prepare(DataConfig(cache_dir=str(bible_cache), max_train_pairs=1000, max_tgt_tokens=8))
    assert small.built == () and len(small.train) == 1000
    assert max(small.train.tgt.length) == 8
    assert set(small.train.src_texts) <= set(bible.train.src_texts)
    smaller = prepare(DataConfig(cache_dir=str(bible_cache), max_train_pairs=300))
    assert set(smaller.train.src_texts) <= set(small.train.src_texts)  # nested subsets


# ---------------------------------------------------------------------------------------------
# batches


def test_batches_respect_budget_and_cover_each_example_once(bible: PreparedData) -> None:
    for budget in (2048, BUDGET):
        seen = []
        for batch in bible.batches(bible.train, budget, shuffle=True, seed=1234, epoch=0):
            b, t = batch.tokens.shape
            assert batch.n_tokens == b * t <= budget
            seen.extend(batch.example_ids.tolist())
        assert sorted(seen) == list(range(len(bible.train)))
        n = bible.len_batches(bible.train, budget, shuffle=True, seed=1234, epoch=0)
        assert n == sum(1 for _ in bible.batches(bible.train, budget, shuffle=True, seed=1234,
                                                 epoch=0))


def test_padding_below_ten_percent_on_bible(bible: PreparedData) -> None:
    padding = bible.padding_fraction(bible.train, BUDGET, shuffle=True, seed=1234, epoch=0)
    assert padding < 0.10, padding
    cells = real = 0
    for batch in bible.batches(bible.train, BUDGET, shuffle=True, seed=1234, epoch=0):
        cells += batch.n_tokens
        real += int((batch.tokens != bible.pad_id).sum())
    assert abs((1 - real / cells) - padding) < 1e-9


def test_targets_cover_target_tokens_and_eos_only(bible: PreparedData) -> None:
    batch = next(bible.batches(bible.val, 4096, shuffle=True, seed=7, epoch=3))
    tokens, targets = batch.tokens, batch.targets
    assert tokens.dtype == targets.dtype == batch.prefix_lens.dtype
    for row, i in enumerate(batch.example_ids.tolist()):
        ex = bible.val[i]
        ns, nt = len(ex.src_ids), len(ex.tgt_ids)
        assert int(batch.prefix_lens[row]) == ns + 1
        expected = ex.src_ids + [bible.sep_id] + ex.tgt_ids + [bible.eos_id]
        assert tokens[row, : len(expected)].tolist() == expected
        assert (tokens[row, len(expected) :] == bible.pad_id).all()
        has_target = (targets[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert has_target == list(range(ns, ns + nt + 1))  # <sep> .. last target token
        assert targets[row, ns : ns + nt + 1].tolist() == ex.tgt_ids + [bible.eos_id]
        assert targets[row, :-1][targets[row, :-1] != IGNORE_INDEX].tolist() == (
            tokens[row, 1:][targets[row, :-1] != IGNORE_INDEX].tolist()
        )
    assert batch.n_target_tokens == int((targets != IGNORE_INDEX).sum())


def test_batches_are_deterministic_and_resumable(bible: PreparedData) -> None:
    def run(seed: int, epoch: int, start: int = 0) -> list[list[int]]:
        return [
            b.example_ids.tolist()
            for b in bible.batches(bible.train, BUDGET, shuffle=True, seed=seed, epoch=epoch,
                                   start_batch=start)
        ]

    full = run(1234, 0)
    assert run(1234, 0) == full
    assert run(1234, 1) != full and run(99, 0) != full
    assert run(1234, 0, start=17) == full[17:]
    resumed = next(bible.batches(bible.train, BUDGET, shuffle=True, seed=1234, epoch=0,
                                 start_batch=5))
    original = list(bible.batches(bible.train, BUDGET, shuffle=True, seed=1234, epoch=0))[5]
    assert resumed.tokens.equal(original.tokens) and resumed.targets.equal(original.targets)
    unshuffled = [b.example_ids.tolist() for b in
                  bible.batches(bible.val, BUDGET, shuffle=False, seed=0, epoch=0)]
    assert unshuffled == [b.example_ids.tolist() for b in
                          bible.batches(bible.val, BUDGET, shuffle=False, seed=5, epoch=9)]


def test_batches_of_plain_examples_and_oversized_example(bible: PreparedData) -> None:
    examples = [bible.val[i] for i in range(20)]
    longest = max(len(e.src_ids) + len(e.tgt_ids) + 2 for e in examples)
    batches = list(bible.batches(examples, longest - 1, shuffle=False, seed=0, epoch=0))
    assert sum(len(b.example_ids) for b in batches) == 20
    over = [b for b in batches if b.n_tokens > longest - 1]
    assert len(over) == 1 and len(over[0].example_ids) == 1  # alone, never with others
    sliced = bible.val[:20]
    assert [e.tgt_text for e in sliced] == [e.tgt_text for e in examples]


# ---------------------------------------------------------------------------------------------
# TSV and JSONL files


def test_tsv_single_file_is_split_by_line_hash(tmp_path: Path) -> None:
    pairs = tiny_pairs(400)
    path = write_tsv(tmp_path / "c.tsv", pairs)
    with path.open("a", encoding="utf-8") as f:
        f.write("\n  spaced   out  \t  espacé \n")  # blank line skipped, whitespace collapsed
    cfg = DataConfig(source="tsv", path=str(path), val_fraction=0.1, test_fraction=0.1)
    corpus = load_corpus(cfg)
    assert corpus == load_corpus(cfg)
    assert sorted(corpus.train + corpus.val + corpus.test) == sorted(
        pairs + [("spaced out", "espacé")]
    )
    assert 15 < len(corpus.val) < 70 and 15 < len(corpus.test) < 70
    shuffled = write_tsv(tmp_path / "shuffled.tsv", pairs[::-1])
    again = load_corpus(DataConfig(source="tsv", path=str(shuffled), val_fraction=0.1,
                                   test_fraction=0.1))
    assert set(again.val) == set(corpus.val) - {("spaced out", "espacé")}  # by content


def test_jsonl_and_explicit_paths(tmp_path: Path) -> None:
    pairs = tiny_pairs(60)
    lines = [json.dumps({"en": s, "fr": t, "id": i}) for i, (s, t) in enumerate(pairs)]
    train = tmp_path / "train.jsonl"
    train.write_text("\ufeff" + "\n".join(lines[:40]) + "\n", encoding="utf-8")  # with a BOM
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(lines[40:50]), encoding="utf-8")
    cfg = DataConfig(source="jsonl", train_path=str(train), val_path=str(val),
                     src_field="en", tgt_field="fr", test_fraction=0.2, vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert corpus.val == pairs[40:50]
    assert sorted(corpus.train + corpus.test) == sorted(pairs[:40])  # test carved from train
    data = prepare(cfg)
    assert data.vocab_size <= 300 and len(data.train) == len(corpus.train)
    assert all(data.decode(e.src_ids) == e.src_text for e in data.val)


@pytest.mark.parametrize(
    ("source", "content", "message"),
    [
        ("tsv", "a\tb\nc\td\ne f\n", r"data.path: .*bad.tsv line 3: expected 2 tab-separated "
                                      r"columns, got 1"),
        ("tsv", "a\tb\tc\n", r"line 1: expected 2 tab-separated columns, got 3"),
        ("tsv", "", r"data.path: .*bad.tsv: no sentence pairs"),
        ("tsv", "\n \n", r"no sentence pairs"),
        ("jsonl", '{"src": "a", "tgt": "b"}\n{"src": "a"\n', r"line 2: invalid JSON"),
        ("jsonl", '{"src": "a", "tgt": "b"}\n{"src": "a"}\n', r"line 2: missing key 'tgt'"),
        ("jsonl", '{"src": "a", "tgt": 3}\n', r"line 1: 'tgt' must be a string, got int"),
        ("jsonl", '["a", "b"]\n', r"line 1: expected a JSON object, got list"),
    ],
)
def test_malformed_files_name_file_and_line(
    tmp_path: Path, source: str, content: str, message: str
) -> None:
    path = tmp_path / f"bad.{source}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_corpus(DataConfig(source=source, path=str(path)))  # type: ignore[arg-type]


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.train_path: .*nope.tsv: file not found"):
        load_corpus(DataConfig(source="tsv", train_path=str(tmp_path / "nope.tsv")))
    good = write_tsv(tmp_path / "good.tsv", tiny_pairs(5))
    with pytest.raises(ConfigError, match=r"data.val_path: .*nope.tsv: file not found"):
        load_corpus(DataConfig(source="tsv", train_path=str(good),
                               val_path=str(tmp_path / "nope.tsv")))
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("a\tb\ncaf\xe9\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.tsv line 2: not UTF-8 .*lines 1-1 read as "
                       r"UTF-8; if the file has another encoding, convert it .*else line 2 is "
                       r"damaged"):
        load_corpus(DataConfig(source="tsv", path=str(latin1)))
    mixed = tmp_path / "mixed.tsv"  # UTF-8 French, then a Latin-1 line: iconv would garble
    mixed.write_bytes("le café\tthe coffee\n".encode() + "caf\xe9\tcoffee\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"mixed.tsv line 2: not UTF-8 .*line 1 and others "
                       r"before it are UTF-8 text beyond ASCII, so the file mixes encodings"):
        load_corpus(DataConfig(source="tsv", path=str(mixed)))
    gbk = tmp_path / "gbk.tsv"
    gbk.write_bytes("起初\t太初\n".encode("gb18030"))
    with pytest.raises(ConfigError, match=r"gbk.tsv line 1: not UTF-8 .*file -i FILE.*GB18030"):
        load_corpus(DataConfig(source="tsv", path=str(gbk)))
    with pytest.raises(ConfigError, match="both set"):
        load_corpus(DataConfig(source="tsv", path=str(good), train_path=str(good)))


# ---------------------------------------------------------------------------------------------
# caches


def test_tsv_trailing_tabs_and_odd_lines(tmp_path: Path) -> None:
    """Trailing tabs (spreadsheet exports) are not columns; a third column, old Mac line
    endings and a lone surrogate in JSONL are one line naming the file and line."""
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"s{i}\tt{i}\t\t\n" for i in range(40)), encoding="utf-8")
    c = load_corpus(DataConfig(source="tsv", path=str(path)))
    assert ("s0", "t0") in c.train + c.val + c.test
    path.write_text("a\tb\n" + "c\td\tsource: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"t.tsv line 2: expected 2 tab-separated columns, "
                       r"got 3; the format is source<TAB>target"):
        load_corpus(DataConfig(source="tsv", path=str(path)))
    path.write_bytes(b"a\tb\rc\td\re\tf\n")
    with pytest.raises(ConfigError, match=r"line 1: .*old Mac line endings"):
        load_corpus(DataConfig(source="tsv", path=str(path)))
    js = tmp_path / "c.jsonl"
    js.write_text('{"en": "a", "zh": "b"}\n{"en": "x", "zh": "y \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c.jsonl line 2: 'zh' holds a lone surrogate"):
        load_corpus(DataConfig(source="jsonl", path=str(js), src_field="en", tgt_field="zh"))


def test_corpus_change_reads_a_touched_file_and_names_an_edited_one(tmp_path: Path) -> None:
    import os

    from trainer.data import check_corpus
    from trainer.data.corpus import corpus_change

    path = write_tsv(tmp_path / "c.tsv", tiny_pairs(60))
    cfg = DataConfig(source="tsv", path=str(path), val_fraction=0.3)
    pinned = check_corpus(cfg)
    assert pinned is not None and corpus_change(cfg, pinned) is None
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same pairs
    assert corpus_change(cfg, pinned) is None
    with path.open("a", encoding="utf-8") as f:
        f.write("x\ty\n")
    assert corpus_change(cfg, pinned) == f"data.path: {path}"
    assert check_corpus(DataConfig(source="bible")) is None


def test_a_val_file_that_repeats_training_pairs_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = tiny_pairs(60)
    train = write_tsv(tmp_path / "train.tsv", pairs)
    val = write_tsv(tmp_path / "val.tsv", pairs[:10] + [("\ufeffnew source", "new target")])
    c = load_corpus(DataConfig(source="tsv", train_path=str(train), val_path=str(val)))
    assert "data.val_path: " in caplog.text and "10 of its 11 pairs are also training pairs" \
        in caplog.text
    assert ("new source", "new target") in c.val  # a byte-order mark mid-file is dropped
    warned = [r for r in caplog.records if "also training pairs" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING"]
    caplog.clear()  # under 1 % (a verse the Bible repeats): said, not warned
    caplog.set_level(logging.INFO, logger="trainer.data.corpus")
    val = write_tsv(tmp_path / "val.tsv", pairs[:1] + [(f"s{i}", f"t{i}") for i in range(120)])
    load_corpus(DataConfig(source="tsv", train_path=str(train), val_path=str(val)))
    assert [r.levelname for r in caplog.records if "also training pairs" in r.getMessage()] \
        == ["INFO"]


def test_a_tsv_header_line_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = tiny_pairs(60)
    path = write_tsv(tmp_path / "h.tsv", [("source", "target"), *pairs])
    load_corpus(DataConfig(source="tsv", path=str(path), val_fraction=0.3))
    assert "h.tsv line 1 looks like a header ('source\\ttarget')" in caplog.text
    caplog.clear()
    load_corpus(DataConfig(source="tsv", path=str(write_tsv(tmp_path / "n.tsv", pairs)),
                           val_fraction=0.3))
    assert "looks like a header" not in caplog.text


def test_encodings_and_non_files_say_what_to_do(tmp_path: Path) -> None:
    import gzip
    import os

    from trainer.data import check_corpus

    gz = tmp_path / "c.tsv.gz"
    gz.write_bytes(gzip.compress(b"a\tb\n" * 20))
    with pytest.raises(ConfigError, match=r"c.tsv.gz line 1: not UTF-8 .*gzip-compressed; "
                       r"decompress it first"):
        check_corpus(DataConfig(source="tsv", path=str(gz)))
    u16 = tmp_path / "u16.tsv"
    u16.write_bytes("a\tb\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"u16.tsv line 1: not UTF-8 .*UTF-16; convert"):
        check_corpus(DataConfig(source="tsv", path=str(u16)))
    fifo = tmp_path / "fifo.tsv"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"data.path: .*fifo.tsv: not a regular file"):
        check_corpus(DataConfig(source="tsv", path=str(fifo)))


def test_check_corpus_reads_and_splits_the_files(tmp_path: Path) -> None:
    """create-study's check: a corpus too small for a validation split is refused then, with
    the file and the fraction named, not in the first trial."""
    from trainer.data import check_corpus

    five = write_tsv(tmp_path / "five.tsv", tiny_pairs(5))
    with pytest.raises(ConfigError, match=r"data.path: .*five.tsv: the validation split is "
                       r"empty \(5 pairs, data.val_fraction 0.02"):
        check_corpus(DataConfig(source="tsv", path=str(five)))
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n" * 50 + "no tab here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.tsv line 51"):
        check_corpus(DataConfig(source="tsv", path=str(bad)))
    check_corpus(DataConfig(source="tsv", path=str(write_tsv(tmp_path / "ok.tsv",
                                                             tiny_pairs(400)))))


def test_blank_sided_tsv_lines_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    path = tmp_path / "sides.tsv"
    path.write_text("a\tb\n\n   \n\t\n  \t \nc\td\n", encoding="utf-8")
    assert load_corpus(DataConfig(source="tsv", path=str(path), val_fraction=0.0,
                                  test_fraction=0.0)).train == [("a", "b"), ("c", "d")]
    assert "2 line(s) with an empty side skipped (line 4, 5)" in caplog.text
    caplog.clear()  # JSONL: a null side is an empty side too
    js = tmp_path / "sides.jsonl"
    js.write_text('{"src": "a", "tgt": "b"}\n{"src": "x", "tgt": null}\n{"src": "c", '
                  '"tgt": "d"}\n', encoding="utf-8")
    assert load_corpus(DataConfig(source="jsonl", path=str(js), val_fraction=0.0,
                                  test_fraction=0.0)).train == [("a", "b"), ("c", "d")]
    assert "1 line(s) with an empty side skipped (line 2)" in caplog.text


def test_many_cut_pairs_are_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Pairs longer than data.max_*_tokens are cut: above a fifth of them, BLEU-4 is capped
    and the log says which limit to raise."""
    long = [(f"w{i} " * 3, " ".join(f"mot{i}x{j}" for j in range(40))) for i in range(300)]
    path = write_tsv(tmp_path / "long.tsv", long)
    cfg = DataConfig(source="tsv", path=str(path), vocab_size=300, max_src_tokens=64,
                     max_tgt_tokens=16, cache_dir=str(tmp_path / "cache"))
    prepare(cfg)
    assert "of the targets than data.max_tgt_tokens=16; they are cut" in caplog.text


def test_a_vocabulary_too_large_for_unspaced_text_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Targets without spaces (31 Han characters for 200 words, order reversed): a 4000-token
    BPE merges them into phrases seen once or twice, the model answers one character to
    everything (BLEU-4 0); the log names the share and a vocabulary that fits."""
    import random

    rng = random.Random(0)
    han = [chr(0x4E00 + 7 * i) for i in range(31)]
    words = {f"w{i}": "".join(rng.choice(han) for _ in range(rng.randint(1, 3)))
             for i in range(200)}
    pairs = []
    for _ in range(3000):
        sentence = [rng.choice(list(words)) for _ in range(rng.randint(3, 8))]
        pairs.append((" ".join(sentence), "".join(words[w] for w in reversed(sentence))))
    path = write_tsv(tmp_path / "han.tsv", pairs)
    cfg = DataConfig(source="tsv", path=str(path), vocab_size=4000, max_src_tokens=60,
                     max_tgt_tokens=60, cache_dir=str(tmp_path / "cache"))
    prepare(cfg)
    assert re.search(r"data: \d+ % of the training targets' tokens are pieces seen fewer than 5 "
                     r"times \(data.vocab_size=4000 is large .*try data.vocab_size=\d+",
                     caplog.text)
    caplog.clear()
    prepare(dataclasses.replace(cfg, vocab_size=500))
    assert "pieces seen fewer" not in caplog.text


def test_unreadable_cache_file_is_rebuilt(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "c.tsv", tiny_pairs(80))
    cfg = DataConfig(source="tsv", path=str(path), vocab_size=300, cache_dir=str(tmp_path / "k"))
    clear_memo()
    first = prepare(cfg)
    assert first.built == ("tokenizer", "tokens")
    (tokens_file,) = (tmp_path / "k").glob("tokens-*.npz")
    tokens_file.write_bytes(tokens_file.read_bytes()[:100])  # truncated
    clear_memo()
    again = prepare(cfg)
    assert again.built == ("tokens",)
    assert np.array_equal(again.train.src.flat, first.train.src.flat)
    # an edited corpus file is read again even within the process
    write_tsv(path, tiny_pairs(90))
    assert len(prepare(cfg).train) > len(first.train)


def _build_in_child(path: str, log: str) -> str:
    def build(f: object) -> None:
        with open(log, "a") as g:
            g.write("built\n")
        time.sleep(0.3)  # long enough for the other process to find the lock held
        f.write(b"payload")  # type: ignore[attr-defined]

    value, _ = load_or_build(Path(path), lambda p: p.read_bytes().decode(), build)
    return value


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    with ctx.Pool(3) as pool:
        values = pool.starmap(_build_in_child, [(str(tmp_path / "f.bin"), str(log))] * 3)
    assert values == ["payload"] * 3
    assert log.read_text() == "built\n"
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# export and the command line


def test_export_round_trips_the_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--src", "4", "--tgt", "5", "--out", str(tmp_path)]) == 0
    assert "train: " in capsys.readouterr().out
    exported = load_corpus(DataConfig(
        source="tsv", train_path=str(tmp_path / "train.tsv"), val_path=str(tmp_path / "val.tsv"),
        test_path=str(tmp_path / "test.tsv"),
    ))
    original = load_corpus(DataConfig())
    assert exported == original  # same pairs, same order, same fingerprint


def test_cli_list_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "World English Bible 2000" in out and "Darby" in out and len(out.splitlines()) == 32
    assert cli.main(["export", "--src", "zz", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amt-data: error: data.bible_src: unknown Bible translation 'zz'")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export"])  # --out missing: argparse's own one-line error
    assert exit_info.value.code == 2


def test_control_tokens_in_the_text_are_text_and_cuts_keep_whole_characters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = [(f"say <sep> {i}", f"d <eos><pad> {i}") for i in range(40)]
    # Japanese targets longer than max_tgt_tokens: a cut must not split a character's bytes
    pairs += [(f"line {i}", "初めに、神が天と地を創造した。" * 3 + str(i)) for i in range(40)]
    path = write_tsv(tmp_path / "c.tsv", pairs)
    with path.open("a", encoding="utf-8") as f:
        f.write("only a source\t\n")
    cfg = DataConfig(source="tsv", train_path=str(path), val_path=str(path), vocab_size=300,
                     max_tgt_tokens=13, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        data = prepare(cfg)
    assert "1 line(s) with an empty side skipped (line 81)" in caplog.text
    for ex in data.val:
        assert data.eos_id not in ex.tgt_ids and data.sep_id not in ex.src_ids
        text = data.decode(ex.tgt_ids)
        assert "\ufffd" not in text and ex.tgt_text.startswith(text)
        if ex.tgt_text.startswith("d "):
            assert text == ex.tgt_text  # '<eos>' and '<pad>' written out round-trip
        else:
            assert 0 < len(ex.tgt_ids) <= 13


def test_bible_placeholder_verses_are_not_pairs() -> None:
    placeholder = corpus_module._bible_placeholder
    assert placeholder("-") and placeholder("***") and placeholder("(*)")
    assert placeholder("상동") and placeholder("(Missing KJV: For the Son of man ...)")
    assert placeholder("(aynı)") and placeholder("(앞절과 동일)") and placeholder("(없음)")
    assert placeholder("Verszeile ohne Text") and not placeholder("aynı gün")
    assert not placeholder("태초에 하나님이 천지를 창조하시니라")
    assert not placeholder("Jesus wept.")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"path": "x.tsv"}, "data.path is set but data.source is 'bible'"),
    ({"train_path": "x.tsv"}, "data.train_path is set but data.source is 'bible'"),
    ({"vocab_size": 50}, "data.vocab_size must be >= 259"),
])
def test_data_config_contradictions(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)  # type: ignore[arg-type]
