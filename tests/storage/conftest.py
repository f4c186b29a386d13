"""Fixtures for the storage tests: real PostgreSQL only.

- ``new_database``: makes fresh ``amt_test_<hex>`` databases on the server at ``$TEST_DB_URL``
  (default: the local PostgreSQL on 127.0.0.1:5432) and drops them when the session ends.
- ``embedded_home``: a private ``$AMT_HOME`` for the embedded PostgreSQL of one test module,
  whose server is stopped and whose files are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("TEST_DB_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin(sql: str) -> None:
    conn = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def new_database() -> Iterator[Callable[[], str]]:
    """Call it for the URL of a new, empty database on the test server."""
    try:
        _admin("SELECT 1")
    except psycopg2.OperationalError as e:
        pytest.skip(f"no PostgreSQL at TEST_DB_URL / 127.0.0.1:5432: {e}")
    made: list[str] = []

    def make() -> str:
        name = f"amt_test_{uuid.uuid4().hex[:12]}"
        _admin(f"CREATE DATABASE {name}")
        made.append(name)
        return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    for name in made:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_url(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture(scope="module")
def embedded_home() -> Iterator[Path]:
    from storage import embedded

    home = Path(tempfile.mkdtemp(prefix="amt-test-home-", dir="/tmp"))
    before = os.environ.get("AMT_HOME")
    os.environ["AMT_HOME"] = str(home)
    try:
        yield home
    finally:
        embedded.stop()
        if before is None:
            del os.environ["AMT_HOME"]
        else:
            os.environ["AMT_HOME"] = before
        shutil.rmtree(home, ignore_errors=True)


def spawn(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """Start ``python -m tests.storage.worker ARGS`` (see worker.py) in the repository."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.storage.worker", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(procs: list[subprocess.Popen[str]], timeout_s: float = 120) -> list[str]:
    """Wait for ``procs``; fail with their stderr if one exits non-zero. Returns stderrs."""
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout_s)
        assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{err[-3000:]}"
        errors.append(err)
    return errors
