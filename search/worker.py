"""``amt-search worker``: one process, one GPU (or the CPU), trials until the study is done.

The worker runs one trial at a time through ``study.optimize`` (so Optuna's heartbeat
thread runs). Stale trials of dead or frozen workers are failed and re-enqueued before each
trial and, by a thread of every worker, every heartbeat interval: a killed worker's trial is
FAIL, with its retry queued, one interval after its grace period ends, also while every live
worker is busy with a trial of its own.
The study's ``n_trials`` counts finished trials over the whole study, one per retry chain
(:func:`search.study.count_trials`): complete, pruned and failed-for-good alike, so a
study of NaN-prone trials still ends. Deciding to start a trial and creating it happen
under a PostgreSQL advisory lock, so parallel workers never overshoot ``n_trials``.

A worker leaves when the study has ``n_trials`` finished trials or ``timeout_s`` has passed
since the study's first trial started; while the last trials run elsewhere it waits, so it
can pick up a retry if one of them dies. SIGTERM (or Ctrl-C): the running trial saves a
checkpoint at its next optimiser step, is re-enqueued for retry, and the worker exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
import zlib
from types import FrameType
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import text

from search.config import SearchConfig
from search.errors import SearchError
from search.objective import DiskFull, Objective, TrialLost, WorkerStopped, claim_run_dirs
from search.study import count_trials, load_study, next_action, open_worker_storage
from storage.errors import CheckpointError, StorageError, error_chain
from storage.rdb import STOP_WAITING, storage_identity
from storage.urls import connect_error
from trainer.errors import ConfigError, TrainingFailed

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


def run_worker(
    study_name: str,
    *,
    gpu: int | None,
    storage_url: str | None = None,
    n_trials: int | None = None,
    worker_index: int | None = None,
) -> int:
    """Run trials of ``study_name`` on GPU ``gpu`` (None: CPU) until the study is done,
    ``n_trials`` trials of this worker ran, or SIGTERM. Returns the exit status (0).

    ``CUDA_VISIBLE_DEVICES`` is set here, before anything initialises CUDA; the process
    keeps its prepared data and CUDA context across trials.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    if gpu is not None:
        import torch

        if gpu < 0 or not torch.cuda.is_available():
            raise SearchError(f"--gpu {gpu}: no such GPU on this host (CUDA_VISIBLE_DEVICES="
                              f"{gpu} leaves no CUDA device) — see nvidia-smi -L, or use --cpu")
    if worker_index is not None and worker_index < 0:
        raise SearchError(f"--worker-index must be >= 0, got {worker_index}")
    index = worker_index if worker_index is not None else (gpu or 0)
    storage = open_worker_storage(study_name, storage_url)
    study, cfg = load_study(study_name, storage, worker_index=index)
    stop = threading.Event()
    STOP_WAITING.clear()  # (a worker run earlier in this process may have set it)
    previous_hook = threading.excepthook
    threading.excepthook = _one_line_storage_errors(previous_hook)
    _handle_signals(stop)
    _quiet_optuna()
    claim_run_dirs(study_name, storage_identity(storage), study._study_id)
    objective = Objective(cfg, stop, device="cpu" if gpu is None else "cuda")
    lock = StartLock(storage, study_name)
    objective.on_trial_start.append(lambda trial: lock.release())
    where = "CPU" if gpu is None else f"GPU {gpu}"
    log.info("worker %d on %s: study %s", index, where, study_name)
    done = threading.Event()
    sweeper = threading.Thread(
        target=_sweep_stale_trials,
        args=(study, cfg.heartbeat_interval_s, done),
        name="stale-trials",
        daemon=True,
    )
    sweeper.start()
    try:
        try:
            ran = _run_trials(study, cfg, objective, lock, stop, n_trials)
        finally:
            done.set()
        if stop.is_set():  # the database may be gone: no more waiting for it
            log.info("worker %d leaves: %d trials here", index, ran)
            return 0
        counts = count_trials(study.get_trials(deepcopy=False))
        log.info(
            "worker %d leaves: %d trials here; study: %d complete, %d pruned, %d failed, "
            "%d running", index, ran, counts.complete, counts.pruned, counts.failed,
            counts.running,
        )
        return 0
    finally:
        STOP_WAITING.clear()  # this process may go on using the storage (tests, benchmarks)
        threading.excepthook = previous_hook


def _one_line_storage_errors(previous: Any) -> Any:
    """A thread's hook (Optuna's heartbeat thread) that logs a StorageError in one line, not
    as a traceback; the trial's own thread meets the same error and ends the worker."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, StorageError):
            log.error("%s: %s", args.thread.name if args.thread else "a thread", args.exc_value)
        else:
            previous(args)

    return hook


MAX_INVALID_IN_A_ROW = 20  # a space with (almost) no valid point would fail trials in a loop


def _run_trials(
    study: optuna.Study,
    cfg: SearchConfig,
    objective: Objective,
    lock: StartLock,
    stop: threading.Event,
    n_trials: int | None,
) -> int:
    """The worker's loop; returns the number of trials it ran."""
    ran = 0
    while not stop.is_set():
        if n_trials is not None and ran >= n_trials:
            log.info("ran %d trials (--n-trials): leaving", ran)
            break
        _fail_stale_trials(study)
        lock.acquire()
        try:
            action = next_action(study, cfg)
            if action == "run":
                try:
                    study.optimize(objective, n_trials=1, catch=(TrainingFailed,))
                except Exception as e:  # Optuna cannot tell the result of a lost trial either
                    given_up = _storage_error_in(e)
                    if given_up is not None:  # Optuna's own error (when it could not store
                        raise given_up from None  # the trial's end) would hide it
                    refused = _database_error_in(e)
                    if refused is not None and objective.lost is None:  # e.g. the database
                        raise connect_error(_url(study), refused) from None  # was dropped
                    if objective.lost is None and any(
                            isinstance(x, KeyError) and "Record does not exist" in str(x)
                            for x in error_chain(e)):
                        raise SearchError(
                            f"study {study.study_name} (or its running trial) was deleted "
                            "while this worker ran (delete-study?): create it again to "
                            "search") from None
                    if objective.lost is None:
                        raise
                    log.warning("trial %d: failed as stale while this worker could not beat "
                                "(it was stopped, or cut off from the database for longer than "
                                "grace_period_s); dropped, its retry runs elsewhere",
                                objective.lost)
                ran += 1
                if objective.invalid_in_a_row >= MAX_INVALID_IN_A_ROW:
                    raise SearchError(
                        f"{objective.invalid_in_a_row} trials in a row drew parameters that "
                        f"make no valid config (the last, {objective.last_invalid}): the space "
                        "has few or no valid combinations; narrow its ranges and create the "
                        "study again")
                continue
        except WorkerStopped:
            break
        finally:
            lock.release()
        if action == "done":
            break
        stop.wait(2.0)  # the last trials run elsewhere; one may die and need a retry
    return ran


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials of dead workers and queue their retries (the storage's callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _sweep_stale_trials(study: optuna.Study, every_s: float, done: threading.Event) -> None:
    """Fail stale trials every ``every_s`` seconds until ``done`` is set."""
    while not done.wait(every_s):
        try:
            _fail_stale_trials(study)
        except Exception as e:  # e.g. the storage gave up during a long outage: next round
            log.warning("stale-trial check failed (%s): trying again in %.0f s", e, every_s)


class StartLock:
    """A PostgreSQL advisory lock per study, held from "is there budget left?" until the trial
    exists: ``pg_try_advisory_xact_lock`` in a transaction left open on its own connection.

    A holder that freezes (SIGSTOP, a hung disk) loses it after ``hold_s``: the transaction
    sets ``idle_in_transaction_session_timeout``, so the server ends that session and the lock
    goes with it. Waiters poll for up to ``timeout_s``, then go on without it.
    """

    def __init__(
        self, storage: Any, study_name: str, timeout_s: float = 30.0, hold_s: float = 10.0
    ) -> None:
        engine = getattr(storage, "engine", None)
        self.engine = (
            engine if engine is not None and engine.dialect.name == "postgresql" else None
        )
        self.key = zlib.crc32(f"amt-search:{study_name}".encode())
        self.timeout_s = timeout_s
        self.hold_ms = int(hold_s * 1000)
        self.conn: Any = None

    def acquire(self) -> None:
        if self.engine is None:
            return
        try:
            conn = self.engine.connect()
        except sqlalchemy.exc.DBAPIError as e:  # the storage calls that follow retry
            log.warning("start lock unavailable (%s): going on without it", type(e).__name__)
            return
        deadline = time.monotonic() + self.timeout_s
        bound = text(f"SET LOCAL idle_in_transaction_session_timeout = {self.hold_ms}")
        query = text("SELECT pg_try_advisory_xact_lock(:k)")
        try:
            while True:
                conn.execute(bound)
                if conn.execute(query, {"k": self.key}).scalar():
                    self.conn = conn  # the transaction stays open: it holds the lock
                    return
                conn.rollback()
                if time.monotonic() > deadline:
                    log.warning("start lock busy for %.0f s: going on without it", self.timeout_s)
                    conn.close()
                    return
                time.sleep(0.2)
        except sqlalchemy.exc.DBAPIError as e:
            log.warning("start lock lost (%s): going on without it", type(e).__name__)
            conn.invalidate()

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.commit()  # the lock ends with the transaction
            conn.close()
        except Exception as e:  # held too long (the server ended the session) or server gone
            log.warning("start lock was lost while held (%s)", type(e).__name__)
            conn.invalidate()


def _storage_error_in(error: BaseException) -> StorageError | None:
    """The StorageError (the database gave up) in ``error``'s chain, if any."""
    return next((e for e in error_chain(error) if isinstance(e, StorageError)), None)


def _database_error_in(error: BaseException) -> sqlalchemy.exc.DBAPIError | None:
    """The database's own error (not an outage: the storage retries those) in ``error``'s
    chain, if any: Optuna reports it as its UnboundLocalError when it could not store a
    trial's end."""
    return next((e for e in error_chain(error) if isinstance(e, sqlalchemy.exc.DBAPIError)),
                None)


def _url(study: optuna.Study) -> str:
    storage = getattr(study._storage, "_backend", study._storage)  # Optuna's cache wraps it
    return str(getattr(storage, "url", ""))


def _handle_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: stop now, without saving
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("%s: saving the running trial and leaving", signal.Signals(signum).name)
        stop.set()
        STOP_WAITING.set()  # no waiting out a database outage: the trial goes stale instead

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (nohup: keep ignoring it)
        signal.signal(signal.SIGHUP, handler)  # the terminal or SSH session closed


class _ExpectedFailures(logging.Filter):
    """Optuna logs every failed trial with a traceback; ours are logged by the objective."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (DiskFull, TrainingFailed, TrialLost, WorkerStopped, ConfigError,
                            CheckpointError, SearchError)):
            return False  # ours, or a user error the command line prints as one line
        if exc is not None and (_storage_error_in(exc) or _database_error_in(exc)):
            return False  # a StorageError or database error: the worker ends on it in one line
        return "failed with value None" not in record.getMessage()


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the worker logs trials itself
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()  # one log format for everything
    logging.getLogger("optuna.study._optimize").addFilter(_ExpectedFailures())
