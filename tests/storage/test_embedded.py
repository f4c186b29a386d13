"""The embedded PostgreSQL: shared by processes, outlives them, stopped by ``db stop``, and
studies that ride out its restart. Runs in a private $AMT_HOME; the server is stopped after."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import psycopg2
import pytest
import sqlalchemy

from storage import StorageError, embedded, open_storage, resolve_url
from storage import cli as storage_cli
from storage.urls import check_url
from tests.storage.conftest import finish, spawn
from tests.storage.test_rdb import assert_study_exact

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def db(action: str, capsys: pytest.CaptureFixture[str], *flags: str, rc: int = 0) -> str:
    """``amt-search db ACTION``, through the subcommand that storage.cli registers."""
    parser = argparse.ArgumentParser(prog="amt-search")
    storage_cli.register(parser.add_subparsers())
    args = parser.parse_args(["db", action, *flags])
    assert args.func(args) == rc
    captured = capsys.readouterr()
    return captured.out if rc == 0 else captured.err


def ask(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_started_once_shared_survives_an_exit_and_db_stop_stops_it(
    embedded_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not embedded.status()["running"]
    procs = [spawn("join", stdin=True) for _ in range(4)]  # all race to start it
    try:
        pids = set()
        for proc in procs:
            assert proc.stdout is not None
            pids.add(proc.stdout.readline().split()[-1])
        assert len(pids) == 1  # one postmaster for all
        log = (embedded_home / "pg" / "server.log").read_text()
        assert log.count("ready to accept connections") == 1  # started exactly once

        assert ask(procs[0], "exit") == ""
        assert procs[0].wait(timeout=10) == 0
        answers = [ask(p, "query") for p in procs[1:]]
        assert all(a.startswith("ok") for a in answers), answers  # outlived that process
        assert len(set(answers)) == 1  # and it is the same server (same start time)

        status = db("status", capsys)
        assert f"running (pid {pids.pop()}" in status
        engine = sqlalchemy.create_engine(check_url(embedded.status()["url"]))
        with engine.connect():  # a client holding a connection, as a worker does
            refused = db("stop", capsys, rc=2)  # it would start the server again
            assert refused.startswith("amt-search: error: the embedded PostgreSQL has 1 ")
            assert "client connection(s)" in refused and "--force" in refused
            assert embedded.status()["running"]
        engine.dispose()
        assert db("stop", capsys).strip() == "stopped the embedded PostgreSQL"
        assert not embedded.status()["running"]
        assert all(ask(p, "query").startswith("error") for p in procs[1:])
        assert "not running" in db("status", capsys)
        assert db("stop", capsys).strip() == "the embedded PostgreSQL was not running"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_frozen_server_is_not_stopped_blind(
    embedded_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    embedded.ensure_server()
    pid = embedded.status()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert "not answering: stopped or busy?" in db("status", capsys)
        refused = db("stop", capsys, rc=2)
        assert "does not answer" in refused and "--force" in refused
    finally:
        os.kill(pid, signal.SIGCONT)
    assert embedded.status()["running"]
    assert db("stop", capsys).strip() == "stopped the embedded PostgreSQL"


def test_restarts_after_the_server_was_killed(embedded_home: Path) -> None:
    url = embedded.ensure_server()
    pid = embedded.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=10)
    assert not embedded.status()["running"]
    assert embedded.ensure_server() == url
    assert embedded.status()["pid"] != pid
    with psycopg2.connect(url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.close()


def test_its_storage_starts_it_again_after_it_was_killed(
    embedded_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AMT_STORAGE_URL", raising=False)
    storage = open_storage()  # the embedded server: the storage may start it again
    optuna.create_study(storage=storage, study_name="killed")
    pid = embedded.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=10)
    started = time.monotonic()
    assert [s.study_name for s in storage.get_all_studies()] == ["killed"]
    assert embedded.status()["pid"] != pid and time.monotonic() - started < 30


def test_a_data_directory_deleted_under_its_storage_is_not_made_anew(
    embedded_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$AMT_HOME deleted under a worker: the storage does not start an empty server in its
    place (its studies are gone); it says so in one line."""
    monkeypatch.delenv("AMT_STORAGE_URL", raising=False)
    storage = open_storage(retry_for_s=30)
    optuna.create_study(storage=storage, study_name="deleted")
    pid = embedded.status()["pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=10)
    shutil.rmtree(embedded.data_dir())
    with pytest.raises(embedded.DataDirectoryGone, match=r"data directory .*pg/data is gone"):
        storage.get_all_studies()
    assert not embedded.data_dir().exists()  # no empty cluster made in its place
    from storage.urls import connect_error

    gone = connect_error(str(storage.url), RuntimeError("connection refused"))
    assert isinstance(gone, embedded.DataDirectoryGone)
    storage.engine.dispose()


def test_eight_processes_twenty_trials_each(embedded_home: Path) -> None:
    url = resolve_url()
    started = time.monotonic()
    finish([spawn("optimize", url, "e8x20", "20") for _ in range(8)])
    print(f"8 x 20 trials on the embedded PostgreSQL: {time.monotonic() - started:.1f} s")
    assert_study_exact(url, "e8x20", 160)


def test_study_survives_a_server_restart(embedded_home: Path) -> None:
    url = resolve_url()
    study = optuna.create_study(storage=open_storage(url), study_name="restart")
    args = ["optimize", url, "restart", "12", "--steps", "3", "--step-sleep", "0.05"]
    workers = [spawn(*args) for _ in range(4)]
    while len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < 8:
        time.sleep(0.2)
    assert embedded.stop()
    time.sleep(3)  # down for 3 s while workers are in the middle of trials
    embedded.ensure_server()
    errors = finish(workers)
    assert any("database unavailable" in e for e in errors)  # they did see the outage
    assert_study_exact(url, "restart", 48, steps=3)


def test_gives_up_after_retry_for(embedded_home: Path) -> None:
    storage = open_storage(resolve_url(), retry_for_s=2)
    storage.restart = None  # (it would start the embedded server again: the test above)
    embedded.stop()
    started = time.monotonic()
    with pytest.raises(StorageError, match="unavailable for 2 s"):
        storage.get_all_studies()
    assert time.monotonic() - started < 5


def test_wrong_password_is_one_line_without_the_password(embedded_home: Path) -> None:
    url = embedded.ensure_server().replace("postgres@", "amt_pw@")
    admin = psycopg2.connect(embedded.ensure_server(), connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE amt_pw LOGIN SUPERUSER PASSWORD 'right-Pw-123'")
        hba = embedded_home / "pg" / "data" / "pg_hba.conf"
        hba.write_text("local all amt_pw scram-sha-256\n" + hba.read_text())
        cur.execute("SELECT pg_reload_conf()")
    admin.close()
    with pytest.raises(StorageError) as caught:
        open_storage(url.replace("amt_pw@", "amt_pw:wrong-Pw-456@"))
    message = str(caught.value)
    assert "wrong password" in message and "\n" not in message
    assert "wrong-Pw-456" not in message and "right-Pw-123" not in message
    with pytest.raises(StorageError, match="wants a password"):
        open_storage(url)
    open_storage(url.replace("amt_pw@", "amt_pw:right-Pw-123@"))
