"""The Optuna study storage: an RDBStorage on PostgreSQL, set up for many workers on shared,
flaky machines.

- Heartbeats: a trial whose worker stops beating for ``grace_period`` seconds is failed by
  the next worker that asks for a trial, and re-queued once (``RetryHeartbeatStaleTrialCallback
  (max_retry=1)``). Beyond Optuna, a RUNNING trial that never beat (its worker died between
  creating it and the first heartbeat) is stale once it is ``grace_period`` old, and nothing is
  declared stale while the server has been up for less than ``grace_period``: after a restart,
  live workers first get the chance to beat again. A stale trial's retry is queued before the
  trial is failed, and a retry's creation token names the trial it retries: a worker killed
  half-way through failing a trial cannot leave it unretried, and no trial is retried twice.
- Connections: ``pool_pre_ping``, a pool sized for the worker threads, TCP keepalives,
  ``connect_timeout``, and server-side ``lock_timeout`` and ``idle_in_transaction_session_timeout``
  so that a frozen worker (SIGSTOP, a hung NFS read) holding a transaction cannot block the
  study: its session is ended and its locks released after that timeout.
- Retries: every storage call is retried with exponential backoff (0.2 s doubling to 5 s,
  for up to ``retry_for_s``) while the error is transient: connection refused or lost, server
  shutting down or starting, lock timeout, deadlock, serialization failure.
- No duplicates from retries: a retried call may have committed before its connection
  dropped. Trial creation carries a unique token in a system attribute, written in the same
  transaction and guarded by a partial unique index, so a second insert of the same trial
  fails and the retry returns the trial the first attempt made. A retried finish
  (``set_trial_state_values``) that finds the trial already finished with the same state and
  values reports success. The other writes are upserts or ignore duplicates already.
- Schema: created once, under a PostgreSQL advisory lock, so workers that start together on a
  fresh database do not race (Optuna issue #1092).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import random
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from storage.errors import StorageError, error_chain
from storage.urls import ENV_VAR, connect_error, mask_url, resolve_url, where

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

CREATE_TOKEN_KEY = "amt:create_token"
_TOKEN_INDEX = "amt_trial_create_token"
_SCHEMA_LOCK = 0x616D745F736368  # pg_advisory_lock key: "amt_sch"
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
# SQLSTATEs worth retrying: connection exceptions (class 08), admin/crash shutdown, cannot
# connect now, lock timeout, idle-in-transaction timeout, serialization failure, deadlock,
# too many connections.
_TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "55P03", "25P03", "40001", "40P01", "53300"}
_PERMANENT_CONNECT_ERRORS = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "pg_hba.conf",
)


def open_storage(
    url: str | None = None,
    *,
    n_workers: int = 1,
    heartbeat_interval: int = 60,
    grace_period: int = 180,
    lock_timeout_s: float = 10.0,
    idle_in_transaction_timeout_s: float = 60.0,
    connect_timeout_s: int = 10,
    retry_for_s: float = 600.0,
    create: bool = True,
) -> RDBStorage:
    """Open the study storage: ``url``, else ``$AMT_STORAGE_URL``, else the embedded
    PostgreSQL (started or joined). Creates the schema on first use; with ``create=False``
    (commands that only read or join studies) a database without it raises StorageError
    and is left as it is.

    ``n_workers`` is the number of threads of this process that run trials (``n_jobs``); each
    needs a connection, and one more for its heartbeat. Keep ``grace_period`` above
    ``heartbeat_interval`` plus 5 s (the longest pause between two retries), so that a
    worker riding out an outage is not declared stale.

    Raises StorageError, one line and without the password, when the URL is bad or the
    server cannot be used (unreachable, wrong password, unknown database, old schema).
    Storage calls raise StorageError once the database has been unreachable for
    ``retry_for_s`` seconds.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if grace_period <= heartbeat_interval:
        raise ValueError(
            f"grace_period ({grace_period} s) must exceed heartbeat_interval "
            f"({heartbeat_interval} s)"
        )
    resolved = resolve_url(url)
    connect_args = _connect_args(
        resolved, lock_timeout_s, idle_in_transaction_timeout_s, connect_timeout_s
    )
    create_schema(resolved, connect_timeout_s=connect_timeout_s, create=create)
    engine_kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": 2 * n_workers,  # a trial thread and its heartbeat thread per worker
        "max_overflow": 2,
        "pool_timeout": 60,
        "pool_recycle": 3600,
        "connect_args": connect_args,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = ResilientRDBStorage(
                resolved,
                engine_kwargs=engine_kwargs,
                skip_table_creation=True,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                retry_for_s=retry_for_s,
            )
            from storage import embedded

            # the embedded server, by default or named (launch passes its URL to the workers)
            if (url is None and not os.environ.get(ENV_VAR)) or embedded.is_embedded_url(resolved):
                storage.restart = functools.partial(embedded.ensure_server, create=False)
            return storage
        except StorageError:
            raise
        except optuna.exceptions.StorageInternalError as e:  # a commit failed while opening
            cause = e.__cause__ or e.__context__
            if isinstance(cause, sqlalchemy.exc.DBAPIError):
                raise connect_error(resolved, cause) from None
            raise StorageError(f"cannot open the study storage at {where(resolved)}: "
                               f"{str(e).splitlines()[0]}") from None
        except RuntimeError as e:  # Optuna: the schema was made by an incompatible version
            raise _old_schema(resolved) from e
        except sqlalchemy.exc.DBAPIError as e:
            raise connect_error(resolved, e) from None


def create_schema(url: str | None = None, *, connect_timeout_s: int = 10,
                  create: bool = True) -> None:
    """Create Optuna's tables (and our trial-token index) unless they exist (``create=False``:
    raise StorageError instead, naming the database, and change nothing).

    Serialised by a PostgreSQL advisory lock: many processes may call it at once on a fresh
    database; one creates, the others wait and find it done. Raises StorageError when the
    server cannot be reached or the tables cannot be created.
    """
    resolved = resolve_url(url)
    engine = sqlalchemy.create_engine(
        resolved,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={
            "connect_timeout": connect_timeout_s,
            "application_name": "amt-search",
            "options": "-c lock_timeout=60000",  # bounds the wait for the advisory lock
        },
    )
    try:
        try:
            conn = engine.connect()
        except sqlalchemy.exc.DBAPIError as e:
            raise connect_error(resolved, e) from None
        with conn:
            if _schema_ready(conn):
                return
            if not create:
                raise StorageError(
                    f"no amt-search studies at {where(resolved)}: the database has no study "
                    "tables — check --storage / $AMT_STORAGE_URL, or create a study first "
                    "(amt-search create-study)")
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
            try:
                if not _schema_ready(conn):
                    _log.info("creating the study schema at %s", where(resolved))
                    _create_tables(resolved, conn)
            except StorageError:
                raise
            except RuntimeError as e:  # tables made by an incompatible Optuna
                raise _old_schema(resolved) from e
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
    except sqlalchemy.exc.DBAPIError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
        raise StorageError(
            f"cannot create the study schema at {where(resolved)}: {reason} — the database "
            "user needs the CREATE privilege on the database"
        ) from None
    finally:
        engine.dispose()


def _old_schema(url: str) -> StorageError:
    return StorageError(
        f"the study schema at {where(url)} was made by another Optuna version than "
        f"{optuna.__version__} — run: optuna storage upgrade --storage URL"
    )


def _schema_ready(conn: sqlalchemy.Connection) -> bool:
    return bool(conn.execute(text(f"SELECT to_regclass('{_TOKEN_INDEX}') IS NOT NULL")).scalar())


def _create_tables(url: str, conn: sqlalchemy.Connection) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        made = RDBStorage(url, engine_kwargs={"poolclass": NullPool})
    made.engine.dispose()
    conn.execute(
        text(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {_TOKEN_INDEX} ON trial_system_attributes "
            f"(value_json) WHERE key = '{CREATE_TOKEN_KEY}'"
        )
    )


def _connect_args(
    url: str, lock_timeout_s: float, idle_in_transaction_timeout_s: float, connect_timeout_s: int
) -> dict[str, Any]:
    """libpq options: timeouts, TCP keepalives, and server-side session settings."""
    settings = (
        f"-c lock_timeout={int(lock_timeout_s * 1000)} "
        f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout_s * 1000)}"
    )
    from_url = sqlalchemy.engine.make_url(url).query.get("options")
    if isinstance(from_url, str) and from_url:  # connect_args would replace the URL's options
        settings = f"{from_url} {settings}"
    return {
        "connect_timeout": connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60_000,
        "application_name": "amt-search",
        "options": settings,
    }


def is_transient(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) is a database error worth retrying."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError):
            if seen.connection_invalidated:
                return True
            code = getattr(seen.orig, "pgcode", None)
            if code:
                return code in _TRANSIENT_SQLSTATES or code.startswith("08")
            if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
                message = str(seen.orig).lower()
                return not any(p in message for p in _PERMANENT_CONNECT_ERRORS)
            return False
        seen = seen.__cause__ or seen.__context__
    return False


_retrying_here = threading.local()
# set (by a worker's SIGTERM) to give up waiting for an unavailable database at once
STOP_WAITING = threading.Event()


class ResilientRDBStorage(RDBStorage):
    """RDBStorage that retries transient database errors and never duplicates a trial by
    retrying. Build it with :func:`open_storage`."""

    def __init__(self, url: str, *, retry_for_s: float = 600.0, **kwargs: Any) -> None:
        self.retry_for_s = retry_for_s
        # the embedded server's starter: called while the server is gone (killed, stopped)
        self.restart: Callable[[], object] | None = None
        self._restarted_at = 0.0
        # when this process last came out of an outage (errors, or a call stalled for half a
        # grace period: a frozen server or network); no trial is stale until a grace period
        # later, when the other workers, back too, have beaten again
        self._outage_ended_at = -math.inf
        super().__init__(url, **kwargs)

    def _stall_s(self) -> float:
        return (self.grace_period or 60.0) / 2

    def _maybe_restart(self, error: BaseException) -> None:
        """Start the embedded server again (at most every 10 s) when it no longer answers."""
        gone = ("connection refused", "no such file or directory")
        text = " ".join(str(e).lower() for e in error_chain(error))  # Optuna wraps the driver's
        if (self.restart is None or time.monotonic() - self._restarted_at < 10.0
                or not any(g in text for g in gone)):
            return
        self._restarted_at = time.monotonic()
        _log.warning("the embedded PostgreSQL is not running: starting it again")
        from storage.embedded import DataDirectoryGone

        try:
            self.restart()
        except DataDirectoryGone:
            raise  # nothing to wait for
        except Exception as e:  # e.g. it cannot start yet: the retries go on
            _log.warning("could not start the embedded PostgreSQL: %s", _first_line(e))

    def _with_retries(self, attempt: Callable[[int], _T]) -> _T:
        """Run ``attempt(n)`` (n = 0, 1, ...) until it succeeds, retrying transient errors with
        exponential backoff for up to ``retry_for_s``. Nested calls run once: the outermost
        call owns the retries."""
        if getattr(_retrying_here, "active", False):
            return attempt(0)
        _retrying_here.active = True
        try:
            deadline = time.monotonic() + self.retry_for_s
            delay = _BACKOFF_FIRST_S
            n = 0
            while True:
                started = time.monotonic()
                try:
                    result = attempt(n)
                except Exception as e:
                    if not is_transient(e):
                        raise
                    self._outage_ended_at = time.monotonic()  # (still going on: a nested
                    # stale check between two attempts must not count heartbeats yet)
                    if time.monotonic() + delay > deadline:
                        raise StorageError(
                            f"the study database at {where(self.url)} has been unavailable "
                            f"for {self.retry_for_s:.0f} s — check that PostgreSQL is running"
                        ) from e
                    if STOP_WAITING.is_set():
                        raise StorageError(
                            f"stopped while the study database at {where(self.url)} was "
                            "unavailable — once it is back, the running trial is failed as "
                            "stale and retried from its last checkpoint by any worker") from e
                    self._maybe_restart(e)
                    if n == 0:
                        _log.warning(
                            "database unavailable (%s); retrying for up to %.0f s",
                            _first_line(e),
                            self.retry_for_s,
                        )
                    # jitter below the delay only: no pause exceeds _BACKOFF_MAX_S, the margin
                    # the grace period keeps over the heartbeat interval
                    STOP_WAITING.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(2 * delay, _BACKOFF_MAX_S)
                    n += 1
                    continue
                if n:
                    _log.warning("database available again after %d retries", n)
                if n or time.monotonic() - started > self._stall_s():
                    self._outage_ended_at = time.monotonic()
                return result
        finally:
            _retrying_here.active = False

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        history = template_trial.system_attrs.get("retry_history") if template_trial else None
        # a retry of trial N is made once, however many processes queue it, however often
        token = f"retry:{study_id}:{history[-1]}" if history else uuid.uuid4().hex
        template = _with_token(template_trial, token)

        def attempt(n: int) -> FrozenTrial:
            try:
                return RDBStorage._create_new_trial(self, study_id, template)
            except sqlalchemy.exc.IntegrityError:
                trial_id = self._trial_id_by_token(token)
                if trial_id is None:
                    raise
                _log.info("trial creation had committed before the connection dropped")
                return RDBStorage.get_trial(self, trial_id)

        return self._with_retries(attempt)

    def _trial_id_by_token(self, token: str) -> int | None:
        with self.engine.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT trial_id FROM trial_system_attributes "
                    "WHERE key = :k AND value_json = :v"
                ),
                {"k": CREATE_TOKEN_KEY, "v": f'"{token}"'},
            ).scalar()
        return int(found) if found is not None else None

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        def attempt(n: int) -> bool:
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except UpdateFinishedTrialError:
                # A retry that finds the trial finished as asked: the first attempt committed.
                # Not for FAIL: stale-trial cleanup in another worker may have set it, and
                # claiming it here would queue the trial's retry twice.
                if n == 0 or state == TrialState.FAIL:
                    raise
                stored = RDBStorage.get_trial(self, trial_id)
                wanted = list(values) if values is not None else None
                if stored.state == state and stored.values == wanted:
                    return True
                raise

        return self._with_retries(attempt)

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        def attempt(n: int) -> int:
            try:
                return RDBStorage.create_new_study(self, directions, study_name)
            except DuplicatedStudyError:
                if n == 0 or study_name is None:
                    raise
                return RDBStorage.get_study_id_from_name(self, study_name)

        return self._with_retries(attempt)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """The stale trials of the study, each with its retry queued already.

        Optuna's ``fail_stale_trials`` fails them, then queues their retries (the callback):
        two transactions, and a worker killed between them left a FAIL trial that was never
        retried. Queued here first, the retry exists before the trial fails; the callback's
        second call is a no-op (the retry's creation token is taken)."""
        stale = self._stale_trial_ids(study_id)
        callback = self.get_heartbeat_stale_trial_callback()
        if stale and callback is not None:
            study = optuna.Study(self.get_study_name_from_id(study_id), self)
            for trial_id in stale:
                callback(study, self.get_trial(trial_id))
                # after the retry is made (it copies the user attributes): why it failed, for
                # the leaderboard's FAIL (stale)
                with contextlib.suppress(UpdateFinishedTrialError):  # failed meanwhile
                    self.set_trial_user_attr(trial_id, "fail_reason", "stale")
        return stale

    def _stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.heartbeat_interval is not None
        grace = self.grace_period or 2 * self.heartbeat_interval
        asked = time.monotonic()
        with self.engine.connect() as conn:
            uptime = conn.execute(
                text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")
            ).scalar_one()
            if time.monotonic() - asked > self._stall_s():
                self._outage_ended_at = time.monotonic()
            # a restarted server, or an outage this process just rode out (the other workers
            # rode it out too and have not beaten since): their heartbeats are old, not dead
            if uptime <= grace or time.monotonic() - self._outage_ended_at < grace:
                return []
            rows = conn.execute(
                text(
                    "SELECT t.trial_id, EXTRACT(EPOCH FROM now() - h.heartbeat), t.datetime_start "
                    "FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                    "WHERE t.study_id = :study_id AND t.state = 'RUNNING'"
                ),
                {"study_id": study_id},
            ).all()
        stale = []
        for trial_id, since_heartbeat, started in rows:
            if since_heartbeat is not None:
                age = float(since_heartbeat)
            elif started is not None:  # never beat; datetime_start is the worker's clock
                age = (datetime.now() - started).total_seconds()
            else:
                continue
            if age > grace:
                stale.append(int(trial_id))
        return stale


def _with_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """A template for Optuna's trial creation that carries ``token`` as a system attribute."""
    if template is None:
        return FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={CREATE_TOKEN_KEY: token},
            intermediate_values={},
            trial_id=-1,
        )
    tagged = copy.deepcopy(template)
    tagged.system_attrs = {**template.system_attrs, CREATE_TOKEN_KEY: token}
    return tagged


def _retrying(method: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(method)
    def wrapper(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> _T:
        return self._with_retries(lambda n: method(self, *args, **kwargs))

    return wrapper


def _first_line(error: BaseException) -> str:
    orig = getattr(error.__cause__, "orig", None) or getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return mask_url(lines[0]) if lines else type(error).__name__


# Every other storage call that touches the database: safe to repeat as a whole (reads,
# upserts, inserts that ignore a duplicate key). Those defined above retry themselves.
_RETRIED = (
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "get_n_trials",
    "record_heartbeat",
    "_get_stale_trial_ids",
)
for _name in _RETRIED:
    setattr(ResilientRDBStorage, _name, _retrying(getattr(ResilientRDBStorage, _name)))

_record_heartbeat = ResilientRDBStorage.record_heartbeat


def _heartbeat_or_warn(self: ResilientRDBStorage, trial_id: int) -> None:
    """Optuna records heartbeats from a thread of its own: a storage that gave up (a long
    outage, or the worker stopping during one) is logged there, not raised into a traceback
    that kills the thread. Without heartbeats the trial goes stale: its retry resumes it."""
    try:
        _record_heartbeat(self, trial_id)
    except StorageError as e:
        _log.warning("heartbeat of trial %d not recorded: %s", trial_id, e)


ResilientRDBStorage.record_heartbeat = _heartbeat_or_warn  # type: ignore[method-assign,assignment]


def storage_identity(storage: RDBStorage) -> str:
    """Names the database behind ``storage`` however its URL spells the host: the server's
    system identifier and the database name (``host:port/db`` when the server will not say)."""
    return _identity(storage.engine, storage.url) or where(storage.url)


def url_identity(url: str | None) -> str | None:
    """:func:`storage_identity` of ``url`` without opening the study storage (nothing is
    created); None when the server cannot be asked."""
    resolved = resolve_url(url)
    engine = sqlalchemy.create_engine(resolved, poolclass=NullPool,
                                      connect_args={"connect_timeout": 10})
    try:
        return _identity(engine, resolved)
    finally:
        engine.dispose()


def _identity(engine: sqlalchemy.Engine, url: str) -> str | None:
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT system_identifier, current_database() FROM pg_control_system()")).one()
        return f"PostgreSQL {row[0]}/{row[1]} ({where(url)})"
    except sqlalchemy.exc.SQLAlchemyError:
        return None
