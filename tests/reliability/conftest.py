"""Fixtures for the fault-injection tests: tiny studies on CPU, worker processes that are
killed, stopped and signalled for real, and the outcome table in ``docs/RELIABILITY.md``.

- ``forkserver``: worker processes for the whole session, forked from one template process
  that imported torch once (``tests/reliability/forkserver.py``); each runs
  ``search.cli.main(["worker", ...])`` in its own process and session.
- ``corpus_dir`` + ``make_study``: a tiny search (2-layer d=32 decoder on a synthetic corpus,
  heartbeat 1 s, grace 6 s, no pruning) created in a database.
- ``embedded_pg``: the embedded PostgreSQL of a private ``$AMT_HOME``, to stop and start.
- ``record``: each test records its scenario's outcome (runs, survived, seconds); the table is
  written when the session ends (rows of scenarios that did not run this time are kept).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from search.config import load_search_config
from search.study import create_study, load_study
from tests.search.conftest import tiny_search, tiny_train
from tests.storage.conftest import new_database  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "docs" / "RELIABILITY.md"
HEARTBEAT_S = 1
GRACE_S = 6  # the smallest a search config allows with a 1 s heartbeat (heartbeat + 5 s)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---------------------------------------------------------------------------------------------
# the outcome table

# Row order of the table; a scenario's row is replaced when a test records it.
SCENARIOS = (
    "kill -9 mid-trial",
    "kill -9 before the first heartbeat",
    "PostgreSQL down 0 s",
    "PostgreSQL down 20 s",
    "PostgreSQL down 60 s",
    "SIGTERM during a PostgreSQL outage",
    "PostgreSQL frozen (SIGSTOP) past the grace period",
    "SIGSTOP a worker (and the start lock's holder) 20 s",
    "SIGTERM a worker",
    "NaN / inf loss",
    "CUDA OOM, recoverable",
    "CUDA OOM at the smallest micro-batch",
    "disk full while checkpointing",
    "disk full in a search trial",
    "read-only disk in a search trial",
    "bad input (CLI table)",
)
_HEADER = "| scenario | runs | survived | lost | seconds | what was checked |"


@dataclass
class Outcome:
    scenario: str
    runs: int
    survived: int
    seconds: float
    checked: str

    def row(self) -> str:
        lost = self.runs - self.survived
        return (
            f"| {self.scenario} | {self.runs} | {self.survived} | {lost} | "
            f"{self.seconds:.1f} | {self.checked} |"
        )


@pytest.fixture(scope="session")
def record() -> Iterator[Callable[..., None]]:
    """``record(scenario, runs, survived, seconds, checked)``; the table is written at the
    end of the session."""
    outcomes: dict[str, Outcome] = {}

    def add(scenario: str, runs: int, survived: int, seconds: float, checked: str) -> None:
        assert scenario in SCENARIOS, scenario
        outcomes[scenario] = Outcome(scenario, runs, survived, seconds, checked)

    yield add
    if outcomes:
        write_table(outcomes)


def write_table(outcomes: dict[str, Outcome]) -> None:
    rows = _rows_in(TABLE)
    rows.update({name: o.row() for name, o in outcomes.items()})
    lines = [
        "# Reliability: faults injected on purpose",
        "",
        "Written by the test run (`pytest tests/reliability`, see `tests/reliability/"
        "conftest.py`); do not edit by hand. Each scenario injects the fault for real on CPU "
        "with a tiny model: worker processes are killed (SIGKILL), frozen (SIGSTOP) or "
        "stopped (SIGTERM), the embedded PostgreSQL is stopped and restarted, the disk is a "
        "full tmpfs. A run *survived* when every check listed passed; *lost* counts the "
        "runs that did not. Heartbeat 1 s, grace period 6 s.",
        "",
        f"Last run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPU cores (shared).",
        "",
        _HEADER,
        "| --- | ---: | ---: | ---: | ---: | --- |",
        *(rows[name] for name in SCENARIOS if name in rows),
        "",
    ]
    TABLE.write_text("\n".join(lines))


def _rows_in(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in SCENARIOS:
            rows[cells[0]] = line
    return rows


# ---------------------------------------------------------------------------------------------
# worker processes


class ForkServer:
    """Client of ``python -m tests.reliability.forkserver``."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "AMT_PROGRESS": "0"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.forkserver"],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.pids: list[int] = []
        self.exits: dict[int, int] = {}
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.changed:
                if "pid" in event:
                    self.pids.append(event["pid"])
                else:
                    self.exits[event["exit"]] = event["rc"]
                self.changed.notify_all()

    def spawn(self, argv: list[str], env: dict[str, str], log: Path,
              target: str = "search.cli:main") -> Worker:
        """Fork a child that runs ``target(argv)`` with ``env`` added, output to ``log``."""
        assert self.proc.stdin is not None
        with self.changed:
            known = len(self.pids)
            request = {"argv": argv, "env": env, "log": str(log), "target": target}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: len(self.pids) > known, timeout=30):
                raise RuntimeError("the fork server did not answer")
            return Worker(self, self.pids[known], log)

    def close(self) -> None:
        for pid in self.pids:  # only our own children, by pid
            if pid not in self.exits:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class Worker:
    server: ForkServer
    pid: int
    log: Path
    killed: bool = False

    def poll(self) -> int | None:
        with self.server.changed:
            return self.server.exits.get(self.pid)

    def wait(self, timeout: float) -> int:
        with self.server.changed:
            if not self.server.changed.wait_for(lambda: self.pid in self.server.exits, timeout):
                raise TimeoutError(f"worker {self.pid} still running after {timeout:.0f} s:\n"
                                   f"{self.tail()}")
            return self.server.exits[self.pid]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def progress(self) -> tuple[int | None, int]:
        """(the trial this worker runs, evals it reported) from its log; (None, 0) between
        trials."""
        text = self.text()
        started = list(re.finditer(r"trial (\d+) (?:starts|resumes):", text))
        if not started:
            return None, 0
        number, rest = int(started[-1][1]), text[started[-1].end():]
        if re.search(rf"trial {number} (?:complete|pruned|failed)", rest):
            return None, 0
        return number, len(re.findall(rf"trial {number} eval \d+ ", rest))


@pytest.fixture(scope="session")
def forkserver() -> Iterator[ForkServer]:
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# the embedded PostgreSQL


@dataclass
class EmbeddedPG:
    """The embedded PostgreSQL of a private ``$AMT_HOME``, stopped and started for real."""

    home: Path
    url: str = ""

    def _call(self, fn: Callable[[], Any]) -> Any:
        before = os.environ.get("AMT_HOME")
        os.environ["AMT_HOME"] = str(self.home)
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["AMT_HOME"]
            else:
                os.environ["AMT_HOME"] = before

    def start(self) -> str:
        from storage import embedded, resolve_url

        self._call(embedded.ensure_server)
        self.url = self._call(resolve_url)
        return self.url

    def stop(self) -> None:
        from storage import embedded

        assert self._call(embedded.stop), "the embedded PostgreSQL was not running"


@pytest.fixture(scope="session")
def embedded_pg() -> Iterator[EmbeddedPG]:
    """One embedded PostgreSQL for the session (initdb takes seconds), under /tmp (its
    socket path must stay short); stopped and removed at the end."""
    from storage import embedded

    pg = EmbeddedPG(Path(tempfile.mkdtemp(prefix="amt-rel-pg-", dir="/tmp")))
    pg.start()
    try:
        yield pg
    finally:
        pg._call(embedded.stop)
        shutil.rmtree(pg.home, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# tiny studies


@pytest.fixture(scope="session")
def corpus_dir() -> Iterator[Path]:
    """The synthetic corpus, the tiny recipe that trains on it (``train.yaml``) and its
    prepared data cache, built once for the session."""
    from trainer.config import config_from_dict
    from trainer.data import prepare

    path = Path(tempfile.mkdtemp(prefix="amt-rel-data-"))
    train = tiny_train(path)  # writes the corpus
    (path / "train.yaml").write_text(yaml.safe_dump(train))
    prepare(config_from_dict(train).data)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class TinyStudy:
    name: str
    url: str
    home: Path  # $AMT_HOME of the workers: run directories under home/runs/<study>
    config: Path
    logs: Path
    n_trials: int

    def env(self, **extra: str) -> dict[str, str]:
        return {"AMT_STORAGE_URL": self.url, "AMT_HOME": str(self.home), **extra}

    def spawn(self, server: ForkServer, index: int, **env: str) -> Worker:
        argv = ["worker", "--study", self.name, "--cpu", "--storage", self.url,
                "--worker-index", str(index)]
        return server.spawn(argv, self.env(**env), self.logs / f"worker-{index}.log")

    def study(self) -> optuna.Study:
        return load_study(self.name, self.url)[0]

    def run_dir(self, number: int) -> Path:
        return self.home / "runs" / self.name / f"trial-{number}"


def make_study(tmp: Path, corpus: Path, url: str, name: str, **changes: Any) -> TinyStudy:
    """Write train.yaml and search.yaml under ``tmp`` and create the study in ``url``.

    Trials: 40 steps with an eval (and checkpoint) every 4, no pruning, random sampler,
    nothing enqueued; ``changes`` replace top-level keys of the search config."""
    shutil.copy(corpus / "train.yaml", tmp / "train.yaml")
    search: dict[str, Any] = {
        **tiny_search(name),
        "truncation": {"max_steps": 40, "eval_every": 4, "eval_subset": 8, "warmup": 0.1},
        "sampler": {"type": "random", "seed": 7},
        "pruner": {"type": "none"},
        "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "enqueue": [],
        "heartbeat_interval_s": HEARTBEAT_S,
        "grace_period_s": GRACE_S,
        **changes,
    }
    config = tmp / "search.yaml"
    config.write_text(yaml.safe_dump(search, sort_keys=False))
    create_study(load_search_config(config), storage_url=url)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    return TinyStudy(name, url, tmp / "home", config, logs, int(search["n_trials"]))


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def resumed_steps(logs: list[str]) -> dict[int, int]:
    """trial number -> the checkpoint step its run continued from, from the workers' logs."""
    found = re.findall(r"resumed from \S*/trial-(\d+)/ckpt_\d+\.pt at step (\d+)", "\n".join(logs))
    return {int(n): int(step) for n, step in found}
