"""Bad input, table-driven, through the real command lines (``amt-search``, ``amt-train``,
``python -m trainer.data``) run as subprocesses.

Every case must end with exit status 2 and exactly one line on stderr, ``<prog>: error: ...``
(``<prog> <command>: error: ...`` for a subcommand's arguments) that names the culprit (a key
path, a file, a URL, a study, a trial, an argument), without a traceback, and must leave the
database (the rows of every table of the study database) and the files on disk (every file
and directory of the case's tree, hashed) as they were.

Each case runs in its own copy of a prepared tree (configs, data, checkpoints, ``$AMT_HOME``).
The cases run in four parallel lanes; each lane has its own copy of a database that holds the
study ``tiny`` (its three warm starts WAITING) as ``$AMT_STORAGE_URL``, so the rows counted
before and after a case are that case's alone.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import torch
import yaml

from search.config import load_search_config
from search.study import create_study
from storage.checkpoints import MANIFEST, save_checkpoint
from tests.reliability.conftest import REPO, EmbeddedPG
from tests.search.conftest import tiny_search, tiny_train
from tests.storage.conftest import ADMIN_URL, _admin

PROGRAMS = {"amt-search": "search.cli", "amt-train": "trainer.cli", "amt-data": "trainer.data"}
WRONG_PASSWORD = "wrong-Pw-456"


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # program, then its arguments; {pw_url} is filled in
    culprit: str  # must appear in the error line
    files: tuple[tuple[str, Any], ...] = ()  # written first: (path, text, YAML data, TrainPatch)


def _search(**changes: Any) -> dict[str, Any]:
    return {**tiny_search(), **changes}


def _space(**changes: Any) -> dict[str, Any]:
    space = dict(tiny_search()["space"])  # type: ignore[call-overload]
    space.update(changes)
    return _search(space=space)


@dataclass(frozen=True)
class TrainPatch:
    """The base tree's train.yaml with keys of one section replaced."""

    section: str
    changes: tuple[tuple[str, Any], ...]

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {**raw, self.section: {**raw[self.section], **dict(self.changes)}}


def _train(section: str, **changes: Any) -> TrainPatch:
    return TrainPatch(section, tuple(changes.items()))


LR = "optim.lr"
CASES = [
    # --- amt-search create-study: the search config and its base recipe
    Case("search YAML syntax", ("amt-search", "create-study", "--config", "bad.yaml"),
         "bad.yaml", (("bad.yaml", "name: tiny\nspace: [unclosed\n"),)),
    Case("base YAML syntax", ("amt-search", "create-study", "--config", "s.yaml"),
         "broken.yaml", (("s.yaml", _search(base_config="broken.yaml")),
                         ("broken.yaml", "model: {n_layers: 2\n"))),
    Case("unknown top-level key", ("amt-search", "create-study", "--config", "s.yaml"),
         "n_trail", (("s.yaml", _search(n_trail=5)),)),
    Case("unknown parameter key", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.optim.lr.lo", (("s.yaml", _space(**{LR: {"type": "float", "lo": 1e-3,
                                                           "high": 1e-2}})),)),
    Case("unknown truncation key", ("amt-search", "create-study", "--config", "s.yaml"),
         "truncation.max_step", (("s.yaml", _search(truncation={
             "max_step": 40, "max_steps": 40, "eval_every": 8, "eval_subset": 16})),)),
    Case("unknown key in the base recipe", ("amt-search", "create-study", "--config",
                                            "search.yaml"),
         "model.n_layer", (("train.yaml", _train("model", n_layer=2)),)),
    Case("n_trials not a number", ("amt-search", "create-study", "--config", "s.yaml"),
         "n_trials", (("s.yaml", _search(n_trials="many")),)),
    Case("max_steps not an integer", ("amt-search", "create-study", "--config", "s.yaml"),
         "truncation.max_steps", (("s.yaml", _search(truncation={
             "max_steps": 40.5, "eval_every": 8, "eval_subset": 16})),)),
    Case("low not a number", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.optim.lr.low", (("s.yaml", _space(**{LR: {"type": "float", "low": "abc",
                                                            "high": 1e-2}})),)),
    Case("heartbeat not a number", ("amt-search", "create-study", "--config", "s.yaml"),
         "heartbeat_interval_s", (("s.yaml", _search(heartbeat_interval_s=[1])),)),
    Case("low > high", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.optim.lr", (("s.yaml", _space(**{LR: {"type": "float", "low": 0.1,
                                                        "high": 0.01}})),)),
    Case("log scale with low = 0", ("amt-search", "create-study", "--config", "s.yaml"),
         "low > 0", (("s.yaml", _space(**{LR: {"type": "float", "low": 0, "high": 0.01,
                                                "log": True}})),)),
    Case("log scale with low < 0", ("amt-search", "create-study", "--config", "s.yaml"),
         "low=-0.001", (("s.yaml", _space(**{LR: {"type": "float", "low": -1e-3,
                                                   "high": 0.01, "log": True}})),)),
    Case("step does not divide the range", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.model.n_layers: step 2", (("s.yaml", _space(**{
             "model.n_layers": {"type": "int", "low": 1, "high": 4, "step": 2}})),)),
    Case("heartbeat beyond an hour", ("amt-search", "create-study", "--config", "s.yaml"),
         "heartbeat_interval_s", (("s.yaml", _search(heartbeat_interval_s=10**15,
                                                     grace_period_s=10**15 + 10)),)),
    Case("empty choices", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.model.d_model.choices", (("s.yaml", _space(**{
             "model.d_model": {"type": "categorical", "choices": []}})),)),
    Case("choices not a list", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.model.d_model.choices", (("s.yaml", _space(**{
             "model.d_model": {"type": "categorical", "choices": 32}})),)),
    Case("searched key not in TrainConfig", ("amt-search", "create-study", "--config", "s.yaml"),
         "model.n_layer", (("s.yaml", _space(**{"model.n_layer": {"type": "int", "low": 1,
                                                                    "high": 2}})),)),
    Case("empty space", ("amt-search", "create-study", "--config", "s.yaml"),
         "space is empty", (("s.yaml", _search(space={}, enqueue=[])),)),
    Case("warm start outside the space", ("amt-search", "create-study", "--config", "s.yaml"),
         "enqueue[0].optim.lr", (("s.yaml", _search(enqueue=[{LR: 0.5}])),)),
    Case("grace period too short", ("amt-search", "create-study", "--config", "s.yaml"),
         "grace_period_s", (("s.yaml", _search(heartbeat_interval_s=10, grace_period_s=12)),)),
    Case("BLEU tokeniser this host cannot run", ("amt-search", "create-study", "--config",
                                                 "s.yaml"), "pip install sacrebleu[ja]",
         (("s.yaml", _search(overrides={"eval.bleu_tokenize": "ja-mecab"})),)),
    Case("corpus file missing", ("amt-search", "create-study", "--config", "search.yaml"),
         "data.path: ", (("train.yaml", _train("data", path="data/gone.tsv")),)),
    Case("the BLEU tokeniser searched", ("amt-search", "create-study", "--config", "s.yaml"),
         "space.eval.bleu_tokenize", (("s.yaml", _space(**{"eval.bleu_tokenize": {
             "type": "categorical", "choices": ["13a", "char"]}})),)),
    Case("trials on another corpus", ("amt-search", "create-study", "--config", "s.yaml"),
         "truncation.overrides.data.path", (("s.yaml", _search(truncation={
             **tiny_search()["truncation"], "overrides": {"data.path": "data/other.tsv"}})),)),
    Case("corpus too small to split", ("amt-search", "create-study", "--config", "search.yaml"),
         "small.tsv: the validation split is empty",
         (("data/small.tsv", "a b\tc d\ne f\tg h\n"),
          ("train.yaml", _train("data", path="data/small.tsv")))),
    Case("corpus gzip-compressed", ("amt-search", "create-study", "--config", "search.yaml"),
         "gz.tsv line 1: not UTF-8", (("data/gz.tsv", gzip.compress(b"a\tb\n" * 50, mtime=0)),
                                      ("train.yaml", _train("data", path="data/gz.tsv")))),
    Case("resume: checkpoints without their manifest", ("amt-train", "--config", "train.yaml",
                                                        "--out-dir", "run-unlisted", "--resume"),
         "run-unlisted holds checkpoint files"),
    Case("corpus in GB18030", ("amt-search", "create-study", "--config", "search.yaml"),
         "gbk.tsv line 1: not UTF-8", (("data/gbk.tsv", "起初\t太初\n".encode("gb18030") * 50),
                                       ("train.yaml", _train("data", path="data/gbk.tsv")))),
    Case("JSONL with a lone surrogate", ("amt-search", "create-study", "--config", "search.yaml"),
         "c.jsonl line 2: 'tgt' holds a lone surrogate",
         (("data/c.jsonl", '{"src": "a", "tgt": "b"}\n{"src": "c", "tgt": "d \\ud83d"}\n'),
          ("train.yaml", _train("data", source="jsonl", path="data/c.jsonl")))),
    Case("Bible language tag for a code", ("amt-search", "create-study", "--config",
                                           "search.yaml"),
         "data.bible_tgt: unknown Bible translation 'zh': did you mean 'c'",
         (("train.yaml", _train("data", source="bible", path=None, bible_tgt="zh")),)),
    Case("unknown Bible translation", ("amt-search", "create-study", "--config", "search.yaml"),
         "data.bible_tgt: unknown Bible translation 'zz'",
         (("train.yaml", _train("data", source="bible", path=None, bible_tgt="zz")),)),
    Case("config file missing", ("amt-search", "create-study", "--config", "nope.yaml"),
         "nope.yaml"),
    Case("config file empty", ("amt-search", "create-study", "--config", "empty.yaml"),
         "empty.yaml", (("empty.yaml", ""),)),
    Case("base config missing", ("amt-search", "create-study", "--config", "s.yaml"),
         "no-such-train.yaml", (("s.yaml", _search(base_config="no-such-train.yaml")),)),
    Case("config not UTF-8", ("amt-search", "create-study", "--config", "latin1.yaml"),
         "latin1.yaml: line 2: not UTF-8", (("latin1.yaml", "n_trials: 4\nname: caf\xe9\n".encode(
             "latin-1")),)),
    Case("key given twice", ("amt-search", "create-study", "--config", "twice.yaml"),
         "duplicate key 'n_trials'", (("twice.yaml", "n_trials: 10\nn_trials: 3\n"),)),
    Case("YAML alias bomb", ("amt-search", "create-study", "--config", "bomb.yaml"),
         "more than 100 aliases", (("bomb.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
             f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
             for p, c in zip("abcdefghijklm", "bcdefghijklmn", strict=True))),)),
    Case("YAML alias bomb under the alias limit", ("amt-search", "create-study", "--config",
                                                   "bomb99.yaml"),
         "expands to more than 100,000 values", (("bomb99.yaml", "a: &a [x, x, x, x, x, x]\n"
                                                 + "".join(
             f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
             for p, c in zip("abcdefghijk", "bcdefghijkl", strict=True))),)),
    Case("meta not plain data", ("amt-search", "create-study", "--config", "s.yaml"),
         "meta.when", (("s.yaml", "base_config: train.yaml\n" + yaml.safe_dump(
             {k: v for k, v in tiny_search().items() if k != "base_config"})
             + "overrides:\n  meta.when: 2024-01-01\n"),)),
    Case("sampler seed out of range", ("amt-search", "create-study", "--config", "s.yaml"),
         "sampler.seed", (("s.yaml", _search(sampler={"seed": -1})),)),
    Case("study name ending in a newline", ("amt-search", "create-study", "--config",
                                            "search.yaml", "--study-name", "nl\n"), "'nl\\n'"),
    Case("bad study name", ("amt-search", "create-study", "--config", "search.yaml",
                            "--study-name", "bad name!"), "bad name!"),
    Case("study exists", ("amt-search", "create-study", "--config", "search.yaml"),
         "study 'tiny' already exists"),
    # --- storage URLs
    Case("MySQL URL", ("amt-search", "status", "--study", "tiny", "--storage",
                       "mysql://u@127.0.0.1/db"), "MySQL"),
    Case("SQLite URL", ("amt-search", "status", "--study", "tiny", "--storage",
                        "sqlite:///studies.db"), "SQLite"),
    Case("garbage URL", ("amt-search", "status", "--study", "tiny", "--storage",
                         "not a url"), "not a url"),
    Case("unknown scheme", ("amt-search", "trials", "--study", "tiny", "--storage",
                            "http://127.0.0.1/db"), "http"),
    Case("bad port", ("amt-search", "status", "--study", "tiny", "--storage",
                      "postgresql://postgres@127.0.0.1:abc/db"), "bad port"),
    Case("no database name", ("amt-search", "status", "--study", "tiny", "--storage",
                              "postgresql://postgres@127.0.0.1:5432"), "no database name"),
    Case("unreachable server", ("amt-search", "create-study", "--config", "search.yaml",
                                "--storage", "postgresql://postgres@127.0.0.1:1/amt"),
         "127.0.0.1:1"),
    Case("unknown database", ("amt-search", "status", "--study", "tiny", "--storage",
                              "postgresql://postgres@127.0.0.1:5432/amt_no_such_db"),
         "amt_no_such_db"),
    Case("unknown user", ("amt-search", "status", "--study", "tiny", "--storage",
                          "postgresql://amt_nobody@127.0.0.1:5432/postgres"), "amt_nobody"),
    Case("wrong password", ("amt-search", "status", "--study", "tiny", "--storage",
                            "{pw_url}"), "wrong password"),
    Case("'@' in the password", ("amt-search", "status", "--study", "tiny", "--storage",
                                 "postgresql://postgres:wrong-Pw@456@127.0.0.1:5432/db"), "%40"),
    # --- studies and trials
    Case("unknown study: status", ("amt-search", "status", "--study", "nope"), "'nope'"),
    Case("unknown study: worker", ("amt-search", "worker", "--study", "nope", "--cpu"),
         "'nope'"),
    Case("unknown study: report", ("amt-search", "report", "--study", "nope", "--out", "rep"),
         "'nope'"),
    Case("unknown trial number", ("amt-search", "promote", "--study", "tiny", "--trial", "99"),
         "trial 99"),
    Case("trial not complete", ("amt-search", "promote", "--study", "tiny", "--trial", "0"),
         "trial 0"),
    Case("no complete trial yet", ("amt-search", "best", "--study", "tiny"),
         "no complete trial"),
    # --- amt-search arguments
    Case("no command", ("amt-search",), "COMMAND"),
    Case("unknown command", ("amt-search", "frobnicate"), "frobnicate"),
    Case("worker without --cpu/--gpu", ("amt-search", "worker", "--study", "tiny"), "--gpu"),
    Case("no CPU workers", ("amt-search", "launch", "--study", "tiny", "--cpu-workers", "0"),
         "--cpu-workers"),
    Case("bad GPU list", ("amt-search", "launch", "--study", "tiny", "--gpus", "x,y"),
         "--gpus"),
    Case("GPU not on this host: worker", ("amt-search", "worker", "--study", "tiny", "--gpu",
                                          "0"), "--gpu 0"),
    Case("GPU not on this host: launch", ("amt-search", "launch", "--study", "tiny", "--gpus",
                                          "0,1"), "no GPU 0, 1"),
    Case("dashboard port out of range", ("amt-search", "dashboard", "--port", "70000"),
         "--port 70000"),
    Case("unknown format", ("amt-search", "trials", "--study", "tiny", "--format", "xml"), "xml"),
    Case("trial not a number", ("amt-search", "promote", "--study", "tiny", "--trial", "ten"),
         "ten"),
    # --- amt-train
    Case("no --config", ("amt-train",), "--config"),
    Case("unknown flag", ("amt-train", "--config", "train.yaml", "--bogus"), "--bogus"),
    Case("train config missing", ("amt-train", "--config", "nope.yaml"), "nope.yaml"),
    Case("train YAML syntax", ("amt-train", "--config", "t.yaml"), "t.yaml",
         (("t.yaml", "train: {max_steps: 4\n"),)),
    Case("train unknown key", ("amt-train", "--config", "t.yaml"), "model.n_layer",
         (("t.yaml", _train("model", n_layer=2)),)),
    Case("train wrong type", ("amt-train", "--config", "t.yaml"), "model.n_layers",
         (("t.yaml", _train("model", n_layers="two")),)),
    Case("train value not allowed", ("amt-train", "--config", "t.yaml"), "data.source",
         (("t.yaml", _train("data", source="csv")),)),
    Case("train impossible shape", ("amt-train", "--config", "t.yaml"), "model.d_model",
         (("t.yaml", _train("model", d_model=30)),)),
    Case("override without =", ("amt-train", "--config", "train.yaml", "--set",
                                "train.max_steps"), "train.max_steps"),
    Case("override bad value", ("amt-train", "--config", "train.yaml", "--set",
                                "train.max_steps=-1"), "train.max_steps"),
    Case("override unknown key", ("amt-train", "--config", "train.yaml", "--set",
                                  "optim.lrr=0.1"), "optim.lrr"),
    Case("model too large to allocate", ("amt-train", "--config", "train.yaml", "--describe",
                                         "--set", "model.d_model=1099511627776"),
         "model.d_model"),
    Case("worker for no trials", ("amt-search", "worker", "--study", "tiny", "--cpu",
                                  "--n-trials", "0"), "--n-trials"),
    Case("seed out of range", ("amt-train", "--config", "train.yaml", "--set",
                               "train.seed=-1"), "train.seed"),
    Case("train config empty", ("amt-train", "--config", "empty.yaml"), "empty.yaml: the "
         "config file is empty", (("empty.yaml", "\n# nothing\n"),)),
    Case("data path without a file source", ("amt-train", "--config", "t.yaml"),
         "data.path is set but data.source is 'bible'",
         (("t.yaml", _train("data", source="bible", path="data/corpus.tsv")),)),
    Case("data file missing", ("amt-train", "--config", "t.yaml"), "missing.tsv",
         (("t.yaml", _train("data", path="missing.tsv", cache_dir="cache")),)),
    Case("data file empty", ("amt-train", "--config", "t.yaml"), "empty.tsv",
         (("t.yaml", _train("data", path="empty.tsv", cache_dir="cache")), ("empty.tsv", ""))),
    Case("data line without a tab", ("amt-train", "--config", "t.yaml"), "notab.tsv",
         (("t.yaml", _train("data", path="notab.tsv", cache_dir="cache")),
          ("notab.tsv", "ka lo\tthe apple bird\nka lo the apple bird\n"))),
    Case("JSONL line nested too deeply", ("amt-train", "--config", "t.yaml"), "deep.jsonl",
         (("t.yaml", _train("data", source="jsonl", path="deep.jsonl", cache_dir="cache")),
          ("deep.jsonl", '{"src": "ka", "tgt": "apple", "n": ' + "[" * 100_000
           + "]" * 100_000 + "}\n"))),
    Case("JSONL number of 5000 digits", ("amt-train", "--config", "t.yaml"), "huge.jsonl",
         (("t.yaml", _train("data", source="jsonl", path="huge.jsonl", cache_dir="cache")),
          ("huge.jsonl", '{"src": "ka", "tgt": "apple", "n": ' + "7" * 5000 + "}\n"))),
    Case("config nested too deeply", ("amt-search", "create-study", "--config", "deep.yaml"),
         "deep.yaml", (("deep.yaml", "name: x\nm: " + "[" * 400 + "]" * 400 + "\n"),)),
    Case("config with a NUL byte", ("amt-train", "--config", "nul.yaml"), "U+0000",
         (("nul.yaml", "model:\n  n_layers: 2\x00\n"),)),
    Case("config integer of 5000 digits", ("amt-search", "create-study", "--config", "s.yaml"),
         "s.yaml", (("s.yaml", "name: x\nn_trials: " + "9" * 5000 + "\n"),)),
    Case("storage URL with a NUL", ("amt-search", "status", "--study", "tiny", "--storage",
                                    "postgresql://postgres@127.0.0.1/x%00y"), "NUL"),
    Case("JSONL line not JSON", ("amt-train", "--config", "t.yaml"), "bad.jsonl",
         (("t.yaml", _train("data", source="jsonl", path="bad.jsonl", cache_dir="cache")),
          ("bad.jsonl", '{"src": "ka", "tgt": "apple"}\n{"src": "lo",\n'))),
    Case("resume: tampered checkpoints", ("amt-train", "--config", "train.yaml", "--out-dir",
                                          "run-tampered", "--resume"), "SHA-256"),
    Case("resume: truncated checkpoints", ("amt-train", "--config", "train.yaml", "--out-dir",
                                           "run-truncated", "--resume"), "truncated"),
    Case("resume: corrupt manifest", ("amt-train", "--config", "train.yaml", "--out-dir",
                                      "run-manifest", "--resume"), MANIFEST),
    Case("resume: checkpoints missing", ("amt-train", "--config", "train.yaml", "--out-dir",
                                         "run-missing", "--resume"), "missing"),
    Case("checkpoints but no --resume", ("amt-train", "--config", "train.yaml", "--out-dir",
                                         "run-good"), "--resume"),
    Case("resume: manifest entry of the wrong type", ("amt-train", "--config", "train.yaml",
                                                      "--out-dir", "run-types", "--resume"),
         "step is 'abc'"),
    # --- python -m trainer.data
    Case("data: unknown command", ("amt-data", "bogus"), "bogus"),
    Case("data: export without --out", ("amt-data", "export", "--config", "train.yaml"),
         "--out"),
    Case("data: config missing", ("amt-data", "export", "--config", "nope.yaml", "--out", "x"),
         "nope.yaml"),
    Case("data: bad fraction", ("amt-data", "export", "--config", "train.yaml",
                                "--val-fraction", "2", "--out", "x"), "val_fraction"),
    Case("data: data file missing", ("amt-data", "prepare", "--config", "t.yaml"),
         "missing.tsv", (("t.yaml", _train("data", path="missing.tsv", cache_dir="cache")),)),
    Case("data: data file empty", ("amt-data", "export", "--config", "t.yaml", "--out", "x"),
         "empty.tsv", (("t.yaml", _train("data", path="empty.tsv", cache_dir="cache")),
                       ("empty.tsv", ""))),
    Case("data: unknown translation", ("amt-data", "export", "--src", "999", "--out", "x"),
         "999"),
]


# ---------------------------------------------------------------------------------------------
# the prepared tree and database


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tree every case starts from: a valid search.yaml and train.yaml (relative data
    paths), the corpus, and run directories with checkpoints (good and damaged)."""
    root = tmp_path_factory.mktemp("bad-input-base")
    (root / "data").mkdir()
    train: dict[str, Any] = tiny_train(root / "data")  # writes the corpus there
    train["data"].update(path="data/corpus.tsv", cache_dir="data/cache")
    train["train"]["out_dir"] = "runs/default"  # in the case's own tree: cases run in parallel
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    (root / "search.yaml").write_text(yaml.safe_dump(tiny_search()))
    for name in ("good", "tampered", "truncated", "manifest", "missing", "types", "unlisted"):
        run = root / f"run-{name}"
        for step in (4, 8):
            path = save_checkpoint(run, step, {"step": torch.tensor(step)})
            data = path.read_bytes()
            if name == "tampered":
                path.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
            elif name == "truncated":
                path.write_bytes(data[: len(data) // 2])
            elif name == "missing":
                path.unlink()
        if name == "manifest":
            (run / MANIFEST).write_text("{not json")
        if name == "unlisted":
            (run / MANIFEST).unlink()
        if name == "types":
            (run / MANIFEST).write_text((run / MANIFEST).read_text().replace('"step": 8',
                                                                            '"step": "abc"'))
    (root / "home").mkdir()
    return root


@pytest.fixture(scope="module")
def lane_db(base: Path) -> Iterator[Callable[[], str]]:
    """Call it for this thread's copy of a database holding the study 'tiny' (three warm
    starts WAITING). Copies are made once per lane: dropping a database costs a checkpoint."""
    template = f"amt_test_{uuid.uuid4().hex[:12]}"
    _admin(f"CREATE DATABASE {template}")
    with contextlib.chdir(base):  # its relative corpus path is the case trees'
        study = create_study(load_search_config(base / "search.yaml"), storage_url=_url(template))
    study._storage._backend.engine.dispose()  # no connection may stay open on a template
    made = [template]
    lanes = threading.local()

    def url() -> str:
        if not hasattr(lanes, "url"):
            name = f"amt_test_{uuid.uuid4().hex[:12]}"
            _admin(f"CREATE DATABASE {name} TEMPLATE {template}")
            made.append(name)
            lanes.url = _url(name)
        return str(lanes.url)

    yield url
    for name in made:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _url(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{database}"


@pytest.fixture(scope="module")
def password_url(embedded_pg: EmbeddedPG) -> str:
    """The embedded PostgreSQL with a user that must give a password, and a wrong one."""
    admin = psycopg2.connect(embedded_pg.url.replace("+psycopg2", ""), connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'amt_pw'")
        if cur.fetchone() is None:
            cur.execute("CREATE ROLE amt_pw LOGIN PASSWORD 'right-Pw-123'")
            hba = embedded_pg.home / "pg" / "data" / "pg_hba.conf"
            hba.write_text("local all amt_pw scram-sha-256\n" + hba.read_text())
            cur.execute("SELECT pg_reload_conf()")
    admin.close()
    return embedded_pg.url.replace("postgres@", f"amt_pw:{WRONG_PASSWORD}@")


def _row_counts(url: str) -> dict[str, int]:
    conn = psycopg2.connect(url.replace("+psycopg2", ""), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = sorted(r[0] for r in cur.fetchall())
            counts = {}
            for table in tables:
                cur.execute(f'SELECT count(*) FROM "{table}"')
                row = cur.fetchone()
                counts[table] = int(row[0]) if row else -1
            return counts
    finally:
        conn.close()


def _tree(root: Path) -> dict[str, str]:
    """Every file (its SHA-256) and directory under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    problems: list[str]


def _run(case: Case, base: Path, url: str, password_url: str) -> Result:
    work = base.parent / f"case-{uuid.uuid4().hex[:8]}"
    shutil.copytree(base, work)
    try:
        train = yaml.safe_load((work / "train.yaml").read_text())
        for rel, content in case.files:
            if isinstance(content, TrainPatch):
                content = content.apply(train)
            if isinstance(content, bytes):
                (work / rel).write_bytes(content)
                continue
            text = content if isinstance(content, str) else yaml.safe_dump(content)
            (work / rel).write_text(text)
        rows_before, tree_before = _row_counts(url), _tree(work)
        program, *args = case.argv
        args = [a.format(pw_url=password_url) for a in args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "AMT_STORAGE_URL": url,
               "AMT_HOME": str(work / "home"), "AMT_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", PROGRAMS[program], *args], cwd=work,
                              env=env, capture_output=True, text=True, timeout=120)
        err = done.stderr.strip()
        problems = []
        if done.returncode != 2:
            problems.append(f"exit status {done.returncode}")
        if "Traceback" in done.stderr or "Traceback" in done.stdout:
            problems.append("a traceback")
        if len(err.splitlines()) != 1 or not re.match(rf"{program}( [a-z-]+)?: error: ", err):
            problems.append("not one error line")
        if case.culprit not in err:
            problems.append(f"does not name {case.culprit!r}")
        if WRONG_PASSWORD in err or "right-Pw-123" in err:
            problems.append("shows a password")
        if _row_counts(url) != rows_before:
            problems.append("changed the database")
        if _tree(work) != tree_before:
            changed = set(_tree(work).items()) ^ set(tree_before.items())
            problems.append(f"changed files {sorted({p for p, _ in changed})}")
        if problems:
            problems.append(f"stderr: {err[-1500:]}")
        return Result(case, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_bad_input_gives_one_line_exit_2_and_changes_nothing(
    base: Path, lane_db: Callable[[], str], password_url: str, record: Callable[..., None]
) -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(
            lambda c: _run(c, base, lane_db(), password_url), CASES))
    failed = [r for r in results if r.problems]
    record("bad input (CLI table)", len(results), len(results) - len(failed),
           time.monotonic() - started,
           "exit 2, one line '<prog>: error: ...' naming the culprit, no traceback, no password; "
           "database rows and the case's files unchanged")
    assert not failed, "\n".join(f"{r.case.name}: {'; '.join(r.problems)}" for r in failed)
