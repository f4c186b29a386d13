"""open_storage against the real PostgreSQL (127.0.0.1:5432 or $TEST_DB_URL), fresh databases."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import optuna
import psutil
import pytest
import sqlalchemy
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

from storage import StorageError, open_storage, rdb
from storage.rdb import CREATE_TOKEN_KEY
from tests.storage.conftest import finish, spawn

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def assert_study_exact(url: str, study_name: str, n: int, steps: int = 0) -> None:
    """Exactly ``n`` trials, all COMPLETE, numbered 0..n-1, each with all its reports."""
    trials = optuna.load_study(study_name=study_name, storage=open_storage(url)).trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n, {s: states.count(s) for s in set(states)}
    assert len(trials) == n
    assert sorted(t.number for t in trials) == list(range(n))
    for t in trials:
        assert "failed_trial" not in t.system_attrs  # no heartbeat retry happened
        assert t.intermediate_values == {s: t.params["x"] + s for s in range(steps)}
        assert t.value == t.params["x"]


def test_eight_processes_twenty_trials_each(new_database: Callable[[], str]) -> None:
    # A fresh database: the 8 workers also race to create the schema and the study.
    url = new_database()
    started = time.monotonic()
    finish([spawn("optimize", url, "s8x20", "20") for _ in range(8)])
    print(f"8 x 20 trials on PostgreSQL 15: {time.monotonic() - started:.1f} s")
    assert_study_exact(url, "s8x20", 160)


def test_reading_a_database_without_the_schema_changes_nothing(
    new_database: Callable[[], str]
) -> None:
    """status, trials, worker ... open the storage with create=False: a mistyped --storage
    (template1, postgres) gets one error line and no tables."""
    url = new_database()
    with pytest.raises(StorageError, match=r"no amt-search studies at .*: the database has no "
                       r"study tables"):
        open_storage(url, create=False)
    from storage.urls import check_url

    engine = sqlalchemy.create_engine(check_url(url))  # the psycopg2 driver
    with engine.connect() as conn:
        tables = conn.execute(sqlalchemy.text(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar()
    engine.dispose()
    assert tables == 0
    open_storage(url)  # create-study's way makes it
    open_storage(url, create=False).engine.dispose()


def test_retried_create_does_not_duplicate(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit succeeds but the client sees the connection drop: the retry must return
    # the trial that was made, not make a second one.
    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage, study_name="dedup")
    real = RDBStorage._create_new_trial
    calls = []

    def commit_then_drop(self: RDBStorage, study_id: int, template: object = None) -> object:
        made = real(self, study_id, template)  # type: ignore[arg-type]
        calls.append(made)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("commit") from _connection_lost()
        return made

    monkeypatch.setattr(RDBStorage, "_create_new_trial", commit_then_drop)
    trial_id = storage.create_new_trial(study._study_id)
    monkeypatch.undo()
    trials = study.get_trials(deepcopy=False)
    assert len(calls) == 1  # the second attempt hit the token index and found the first
    assert [t._trial_id for t in trials] == [trial_id]
    assert trials[0].state == TrialState.RUNNING
    assert CREATE_TOKEN_KEY in trials[0].system_attrs


def test_retried_finish_reports_success(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage, study_name="finish")
    trial_id = storage.create_new_trial(study._study_id)
    real = RDBStorage.set_trial_state_values
    calls = []

    def commit_then_drop(self: RDBStorage, *args: object, **kwargs: object) -> bool:
        ok = real(self, *args, **kwargs)  # type: ignore[arg-type]
        calls.append(ok)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("commit") from _connection_lost()
        return ok

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", commit_then_drop)
    assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5]) is True
    monkeypatch.undo()
    assert storage.get_trial(trial_id).values == [0.5]


def test_killed_worker_leaves_no_running_trial(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(storage=storage, study_name="sigkill")
    worker = spawn("sleep", pg_url, "sigkill", "--heartbeat", "1", "--grace", "3")
    assert worker.stdout is not None
    assert worker.stdout.readline().startswith("started")
    # A trial whose worker died before its first heartbeat (Optuna alone never fails it).
    storage.create_new_trial(study._study_id)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_at = time.monotonic()

    fail_stale_trials(study)  # within the grace period: nothing is stale yet
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2

    time.sleep(max(0.0, killed_at + 3.5 - time.monotonic()))
    study.optimize(lambda t: 1.0, n_trials=2)  # fails the stale trials, then runs their retries
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert [t.system_attrs["failed_trial"] for t in trials[2:]] == [0, 1]


def test_a_stale_trial_is_retried_once_even_if_its_failer_dies(pg_url: str) -> None:
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=6)
    study = optuna.create_study(storage=storage, study_name="retry-once")
    dead = optuna.trial.create_trial(state=TrialState.RUNNING)  # its worker died before beating
    dead.datetime_start = datetime.now() - timedelta(seconds=60)
    trial_id = storage.create_new_trial(study._study_id, template_trial=dead)
    # a worker that found it stale, then was killed before failing it: the retry is queued
    assert storage._get_stale_trial_ids(study._study_id) == [trial_id]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    fail_stale_trials(study)  # the next worker fails it; its callback queues no second retry
    fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["retry_history"] == [0]
    assert trials[0].user_attrs["fail_reason"] == "stale"  # the retry does not inherit it
    assert "fail_reason" not in trials[1].user_attrs


def test_no_trial_is_stale_until_a_grace_period_after_an_outage(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen server or a cut network stops every worker's heartbeat at once: when it is
    back, the first worker to look must not fail the others' trials before they beat again.
    An outage is a call that failed and was retried, or one that stalled half a grace period."""
    storage = open_storage(pg_url, heartbeat_interval=1, grace_period=6)
    study = optuna.create_study(storage=storage, study_name="outage")
    old = optuna.trial.create_trial(state=TrialState.RUNNING)
    old.datetime_start = datetime.now() - timedelta(seconds=60)  # not beaten for a minute
    trial_id = storage.create_new_trial(study._study_id, template_trial=old)
    calls = []

    def lost_once(n: int) -> None:  # a storage call: the first attempt loses the connection
        calls.append(n)
        if n == 0:
            raise optuna.exceptions.StorageInternalError("read") from _connection_lost()

    storage._with_retries(lost_once)  # an outage ridden out
    assert calls == [0, 1]
    assert storage._stale_trial_ids(study._study_id) == []
    storage._outage_ended_at -= 6.1  # a grace period later

    def check_after_a_lost_connection(n: int) -> list[int]:  # the stale check's own retry
        if n == 0:
            raise optuna.exceptions.StorageInternalError("read") from _connection_lost()
        return storage._stale_trial_ids(study._study_id)

    assert storage._with_retries(check_after_a_lost_connection) == []
    storage._outage_ended_at -= 6.1  # a grace period later
    assert storage._stale_trial_ids(study._study_id) == [trial_id]
    storage._with_retries(lambda n: time.sleep(3.2))  # a stall: half the grace period
    assert storage._stale_trial_ids(study._study_id) == []


def test_stopped_worker_holding_a_lock_does_not_block_others(pg_url: str) -> None:
    idle_timeout = 3.0
    options = {"lock_timeout_s": 1.0, "idle_in_transaction_timeout_s": idle_timeout}
    storage = open_storage(pg_url, **options)  # type: ignore[arg-type]
    study = optuna.create_study(storage=storage, study_name="sigstop")
    holder = spawn("hold-lock", pg_url, "sigstop", "--lock-timeout", "1", "--idle-timeout", "3")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        while psutil.Process(holder.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.05)
        study.optimize(lambda t: 1.0, n_trials=10)
        blocked_s = time.monotonic() - locked_at
        print(f"trials created {blocked_s:.1f} s after a frozen worker took the study lock")
        assert psutil.Process(holder.pid).status() == psutil.STATUS_STOPPED
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 10
        assert blocked_s < idle_timeout + 4.0  # timeout + lock wait + one Optuna retry pause
    finally:
        holder.kill()
        holder.wait()


def test_no_retry_pause_exceeds_the_backoff_cap(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # grace_period >= heartbeat_interval + 5 s holds only if a heartbeat retrying through an
    # outage never sleeps longer than 5 s between two attempts.
    storage = open_storage(pg_url, retry_for_s=60)
    clock = {"now": 0.0}
    pauses: list[float] = []

    def sleep(s: float) -> None:
        pauses.append(s)
        clock["now"] += s

    monkeypatch.setattr(rdb.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(rdb.STOP_WAITING, "wait", sleep)  # how the retries pause
    monkeypatch.setattr(rdb.random, "uniform", lambda low, high: high)  # the worst jitter

    def down(n: int) -> None:
        raise _connection_lost()

    with pytest.raises(StorageError, match="unavailable for 60 s"):
        storage._with_retries(down)
    monkeypatch.undo()
    assert len(pauses) > 10 and max(pauses) <= rdb._BACKOFF_MAX_S


def _connection_lost() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError(
        "COMMIT", {}, Exception("server closed the connection unexpectedly")
    )
