"""One trial: Optuna parameters -> TrainConfig -> ``trainer.fit`` -> BLEU-4.

The trial trains the study's recipe cut to the truncation budget, in
``<state dir>/runs/<study>/trial-<number>``. At every evaluation the pruning callback reports
BLEU-4 at step k (the k-th eval) and raises :class:`optuna.TrialPruned` when the pruner says
so (never at the budget's last eval: the trial has spent it all); ``fit`` saves a checkpoint
and re-raises. The trial's value is the final BLEU-4.

Failure handling:

* a retry (of a trial whose worker died, or that was stopped by SIGTERM) copies the newest
  checkpoint of the trial it retries into its own run directory and resumes from it;
* ``TrainingFailed`` that cannot be helped by a retry (NaN loss, OOM at the smallest
  micro-batch) ends the trial FAIL with ``fail_reason`` in its user attributes; it is not
  retried (only stale or stopped trials are) and the worker goes on;
* ``ConfigError`` from the trial's training (the corpus cannot be read or split, the recipe
  is invalid): every trial would fail the same way, so the trial is re-enqueued and FAIL with
  ``fail_reason: config``, and the error ends the worker (the command line prints it);
* the trial's run directory changed under it (a file or the directory deleted, the manifest
  garbled): the trial FAILs with ``fail_reason: run_dir`` and is retried once, like a stale
  trial; the worker goes on;
* SIGTERM (``stop`` set): the next optimiser step raises :class:`WorkerStopped`, ``fit``
  saves, the trial is re-enqueued for retry, and the exception ends the worker's loop;
* a worker frozen (SIGSTOP) past the grace period finds its trial failed and retried by
  another worker: the storage refuses the trial's next write and the call raises
  :class:`TrialLost`; the worker drops the trial and goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

import trainer
from search.config import ParamSpec, SearchConfig, trial_train_config
from search.errors import SearchError
from storage.checkpoints import keep_newest, latest_checkpoint
from storage.errors import WRITE_ERRNOS, CheckpointError, error_chain, os_error_in, write_hint
from storage.files import atomic_write
from storage.paths import state_dir
from trainer.config import TrainConfig
from trainer.errors import ConfigError, TrainingFailed

__all__ = ["DiskFull", "Objective", "PruningCallback", "TrialLost", "WorkerStopped", "run_dir"]

log = logging.getLogger(__name__)


class WorkerStopped(Exception):
    """The worker was asked to stop (SIGTERM); the trial saved and was re-enqueued."""


class DiskFull(SearchError):
    """A trial could not write its run directory (checkpoint, metrics): no space left."""


class TrialLost(Exception):
    """Another worker failed this worker's trial as stale and queued its retry."""


def run_dir(study_name: str, trial_number: int) -> Path:
    return state_dir() / "runs" / study_name / f"trial-{trial_number}"


OWNER_FILE = ".study"  # in runs/<study>/: which storage and study the trial directories are of


def claim_run_dirs(study_name: str, storage_where: str, study_id: int) -> None:
    """Mark ``runs/<study_name>`` as this study's (``storage_where`` names its database), or
    refuse when it holds the runs of a study of the same name in another database: a trial
    of this one would delete that study's checkpoint of the same number.

    Raises:
        SearchError: the directory belongs to a study in another storage.
    """
    root = state_dir() / "runs" / study_name
    marker = root / OWNER_FILE
    owner = {"storage": storage_where, "study_id": study_id}
    root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(owner) + "\n"
    try:  # first claim: exclusive, so two workers starting together cannot both win
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return
    previous = check_run_dirs(study_name, storage_where)
    if previous != owner:  # an earlier study of this name in this storage (deleted), or unread
        atomic_write(marker, lambda f: f.write(text.encode()), mode=0o644)


def check_run_dirs(study_name: str, storage_where: str) -> Any:
    """The owner recorded in ``runs/<study_name>`` (None when there is none); SearchError
    when it is a study of that name in another storage. Writes nothing (create-study asks
    before it makes the study)."""
    root = state_dir() / "runs" / study_name
    marker = root / OWNER_FILE
    previous: Any = None
    for _ in range(50 if marker.exists() else 0):  # a first claimant may be writing it now
        try:
            previous = json.loads(marker.read_text())
            break
        except (OSError, ValueError):
            time.sleep(0.1)

    def server(text: Any) -> str:  # "PostgreSQL <system id>/<db> (<host:port/db>)" -> id/db
        return str(text).split(" (")[0]

    if (isinstance(previous, dict) and previous.get("storage") is not None
            and server(previous["storage"]) != server(storage_where)):
        named = str(previous["storage"])
        named = named[named.find("(") + 1:-1] if named.endswith(")") else named  # host:port/db
        raise SearchError(
            f"{root} holds the trial runs of study '{study_name}' in another storage "
            f"({named}): this study's trials would overwrite them — give it "
            "another name (create-study --study-name), set AMT_HOME to another directory, or, "
            f"if that database is gone (the embedded one made anew), delete {root}")
    return previous


def suggest(trial: optuna.Trial, p: ParamSpec) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    assert p.low is not None and p.high is not None
    if p.type == "int":
        step = int(p.step) if p.step is not None and not p.log else 1
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=step, log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


class Pruned(optuna.TrialPruned):
    """Pruned at an eval: ``trainer.fit`` writes no checkpoint (a pruned trial never resumes)."""

    checkpoint = False


class PruningCallback:
    """``trainer.fit`` callback: report BLEU-4 at each eval, prune (not at the last eval
    of the budget), stop on SIGTERM."""

    def __init__(self, trial: optuna.Trial, eval_every: int, stop: threading.Event,
                 n_evals: int | None = None) -> None:
        self.trial = trial
        self.eval_every = eval_every
        self.stop = stop
        self.n_evals = n_evals  # the budget's last eval: reported, never pruned at
        self.history: list[dict[str, float]] = []
        self.step_ends: list[float] = []  # Unix time of the first two optimiser steps' ends

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        k = math.ceil(step / self.eval_every)
        bleu = float(metrics["bleu"])
        log.info(
            "trial %d eval %d (step %d): BLEU-4 %.2f, val loss %.4f, %.0f tok/s",
            self.trial.number,
            k,
            step,
            bleu,
            metrics["val_loss"],
            metrics["tokens_per_s"],
        )
        try:
            self.trial.report(bleu, k)
        except KeyError as e:  # the study was deleted (delete-study --force): no checkpoint,
            e.checkpoint = False  # type: ignore[attr-defined]  # its run directory may be
            raise  # another study's by now; the worker ends with one line
        # at the budget's last eval the trial has spent it all: pruning saves nothing and throws
        # its result away (a rung can fall there, e.g. 8 evals with rungs at 2 and 8)
        if (self.n_evals is None or k < self.n_evals) and self.trial.should_prune():
            raise Pruned(f"pruned at eval {k} (step {step}) with BLEU-4 {bleu:.2f}")

    def on_step(self, step: int) -> None:
        if len(self.step_ends) < 2:
            self.step_ends.append(time.time())
        if self.stop.is_set():
            raise WorkerStopped(f"stopped at step {step}")


class Objective:
    """Callable for ``study.optimize``; one instance per worker (the prepared data and the
    CUDA context stay in the process across trials)."""

    def __init__(self, cfg: SearchConfig, stop: threading.Event, device: str) -> None:
        self.cfg = cfg
        self.stop = stop
        self.device = device  # "cuda" or "cpu": what the compute seconds are
        self.on_trial_start: list[Any] = []  # called with the trial once it exists
        self.lost: int | None = None  # the trial the last call lost (raised TrialLost)
        self._corpus: dict[str, Any] | None = None  # the study's pinned corpus, read once
        self.invalid_in_a_row = 0  # trials in a row whose parameters made no valid config
        self.last_invalid = ""

    def __call__(self, trial: optuna.Trial) -> float:
        for fn in self.on_trial_start:
            fn(trial)
        self.lost = None
        try:
            value = self._run(trial)
            self.invalid_in_a_row = 0
            return value
        except TrainingFailed as e:
            invalid = e.reason == "invalid_params"
            self.invalid_in_a_row = self.invalid_in_a_row + 1 if invalid else 0
            self.last_invalid = str(e)
            raise
        except optuna.TrialPruned:
            self.invalid_in_a_row = 0
            raise
        except optuna.exceptions.UpdateFinishedTrialError as e:
            self.lost = trial.number
            raise TrialLost(
                f"trial {trial.number} was failed by another worker while this one was stopped "
                "for longer than the grace period; its retry runs there"
            ) from e

    def _check_corpus(self, trial: optuna.Trial, train_cfg: TrainConfig) -> None:
        """ConfigError when a corpus file holds other pairs than at create-study: its trials'
        BLEU-4 would not be comparable with the earlier ones."""
        from search.study import pinned_corpus
        from trainer.data.corpus import corpus_change

        if self._corpus is None:
            self._corpus = pinned_corpus(trial.study)
        if not self._corpus:
            return  # the Bible, or a study made before corpora were pinned
        changed = corpus_change(train_cfg.data, self._corpus)
        if changed:
            raise ConfigError(
                f"{changed}: the file changed since create-study (other sentence pairs): this "
                "study's trials would not be comparable; put the file back, or create a new "
                "study on it")

    def _run(self, trial: optuna.Trial) -> float:
        params = {p.name: suggest(trial, p) for p in self.cfg.space}
        out_dir = run_dir(trial.study.study_name, trial.number)
        try:
            resume = self._prepare_run_dir(trial, out_dir)
        except OSError as e:  # a read-only or full file system before the trial started
            if not _disk_full(e):
                raise
            raise self._disk_full_stop(trial, out_dir, e) from e
        name = f"{trial.study.study_name}-trial-{trial.number}"
        try:
            train_cfg = trial_train_config(self.cfg, params, out_dir=out_dir, name=name)
        except ConfigError as e:  # a combination of values create-study could not check
            trial.set_user_attr("fail_reason", "invalid_params")
            trial.set_user_attr("fail_message", str(e))
            log.warning("trial %d failed (invalid_params), not retried: %s", trial.number, e)
            raise TrainingFailed(f"trial {trial.number}: {e}", reason="invalid_params") from None
        trial.set_user_attr("run_dir", str(out_dir))
        trial.set_user_attr("n_params", _n_params(train_cfg))
        log.info(
            "trial %d %s: %s",
            trial.number,
            "resumes" if resume else "starts",
            ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
        )
        callback = PruningCallback(trial, self.cfg.truncation.eval_every, self.stop,
                                   n_evals=self.cfg.truncation.n_evals)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        started_at = time.time()
        try:
            self._check_corpus(trial, train_cfg)
            result = trainer.fit(train_cfg, [callback], resume=resume)
        except optuna.TrialPruned as e:
            log.info("trial %d pruned: %s", trial.number, e)
            _drop_checkpoints(out_dir)  # a pruned trial is never resumed
            raise
        except TrainingFailed as e:  # the retry (made first) must not inherit the reason
            if e.retryable:
                log.warning("trial %d failed (%s), %s: %s", trial.number, e.reason,
                            _retry_word(_enqueue_retry(trial, bounded=True)), e)
            else:
                log.warning("trial %d failed (%s), not retried: %s", trial.number, e.reason, e)
                _drop_checkpoints(out_dir)
            trial.set_user_attr("fail_reason", e.reason)
            trial.set_user_attr("fail_message", str(e))
            raise
        except ConfigError as e:  # the corpus or the recipe: every trial would fail so, and the
            # worker stops; the trial waits in the queue for the fixed run (nothing is lost)
            _enqueue_retry(trial, bounded=False)
            trial.set_user_attr("fail_reason", "config")
            trial.set_user_attr("fail_message", str(e))
            raise
        except WorkerStopped as e:
            log.info("trial %d %s: checkpoint saved, re-enqueued for retry", trial.number, e)
            _enqueue_retry(trial, bounded=False)
            trial.set_user_attr("fail_reason", "stopped")
            raise
        except Exception as e:
            damaged = _run_dir_error(e, out_dir)
            if damaged is not None:  # deleted or garbled under the trial (not by the trial)
                log.warning("trial %d failed (run_dir), %s: %s", trial.number,
                            _retry_word(_enqueue_retry(trial, bounded=True)), damaged)
                trial.set_user_attr("fail_reason", "run_dir")
                trial.set_user_attr("fail_message", damaged)
                raise TrainingFailed(f"trial {trial.number}: {damaged}", reason="run_dir",
                                     retryable=True) from e
            if not _disk_full(e):
                raise
            # every trial of this worker would hit it: the trial waits for a retry (from its
            # last checkpoint, which a failed write leaves intact) and the worker stops
            raise self._disk_full_stop(trial, out_dir, e) from e
        finally:
            self._record(trial, out_dir, callback.history, wall0, cpu0)
            ends = callback.step_ends + [None] * (2 - len(callback.step_ends))
            trial.set_user_attr("timing", {  # Unix seconds: idle between trials, set-up cost
                "fit_started_at": started_at, "first_step_at": ends[0],
                "second_step_at": ends[1], "fit_ended_at": time.time()})
        keep_newest(out_dir, 1)  # a complete trial never resumes: its final checkpoint only
        for key, value in {
            "val_loss": result.val_loss,
            "best_val_loss": result.best_val_loss,
            "best_step": result.best_step,
            "steps": result.steps,
            "tokens": result.tokens,
            "checkpoint": result.checkpoint,
            "checkpoint_sha256": result.checkpoint_sha256,
            "stopped_by": result.stopped_by,
            "bleu_signature": result.bleu_signature,
        }.items():
            trial.set_user_attr(key, value)
        log.info("trial %d complete: BLEU-4 %.2f", trial.number, result.bleu)
        return result.bleu

    @staticmethod
    def _disk_full_stop(trial: optuna.Trial, out_dir: Path, e: BaseException) -> DiskFull:
        """The trial waits for a retry (from its last checkpoint, which a failed write leaves
        intact); the worker stops: every trial of it would hit the same."""
        cause = os_error_in(e)
        message = (str(e).splitlines() or [type(e).__name__])[0]
        hint = write_hint(cause) if cause is not None else ""
        where = (Path(str(cause.filename)).parent if cause is not None and cause.filename
                 else out_dir.parent)  # the data cache fills up too
        _enqueue_retry(trial, bounded=False)
        trial.set_user_attr("fail_reason", "disk_full")
        trial.set_user_attr("fail_message", message)
        return DiskFull(
            f"trial {trial.number}: {message}; the trial is queued to resume from its last "
            f"checkpoint; under {where}{hint or ': free disk space'}, then run the "
            "workers again")

    def _prepare_run_dir(self, trial: optuna.Trial, out_dir: Path) -> bool:
        """Fill ``out_dir`` for this trial; True when there is a checkpoint to resume."""
        if out_dir.is_symlink() or out_dir.exists():  # left by an earlier study of the name
            log.warning("removing %s (left by an earlier study named the same)", out_dir)
            if out_dir.is_dir() and not out_dir.is_symlink():
                shutil.rmtree(out_dir)
            else:  # a file or a link where the run directory goes
                out_dir.unlink()
        history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
        if not history:
            return False
        for number in reversed(history):  # the newest attempt with a verified checkpoint
            source = run_dir(trial.study.study_name, number)
            if source.exists() and latest_checkpoint(source) is not None:
                shutil.copytree(source, out_dir)
                for older in history:  # superseded by the copy: GBs per attempt at full size
                    _drop_checkpoints(run_dir(trial.study.study_name, older))
                trial.set_user_attr("resumed_from", number)
                # the evals before the checkpoint, so the trial's BLEU-4 curve is whole (not
                # those after it: a killed attempt may have logged an eval it never saved)
                ckpt = latest_checkpoint(out_dir)
                upto = int(ckpt.stem.split("_")[-1]) if ckpt is not None else 0
                for m in _read_metrics(out_dir):
                    if m["step"] <= upto:
                        trial.report(float(m["bleu"]),
                                     math.ceil(m["step"] / self.cfg.truncation.eval_every))
                return True
        trial.set_user_attr("resumed_from", None)  # retried, but from scratch
        return False

    def _record(
        self,
        trial: optuna.Trial,
        out_dir: Path,
        history: list[dict[str, float]],
        wall0: float,
        cpu0: float,
    ) -> None:
        """Compute used by this attempt, and the eval curve (the whole run's: a resumed
        trial's metrics.jsonl holds the evals before the checkpoint too)."""
        wall = time.perf_counter() - wall0
        trial.set_user_attr("device", self.device)
        trial.set_user_attr("wall_seconds", round(wall, 1))
        trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu0, 1))
        if self.device == "cuda":
            trial.set_user_attr("gpu_seconds", round(wall, 1))  # one GPU per worker
        history = _read_metrics(out_dir) or history
        if history:
            trial.set_user_attr("curve", _curve(history))
            last = history[-1]
            trial.set_user_attr("val_loss", last["val_loss"])
            trial.set_user_attr("tokens_per_s", round(last["tokens_per_s"], 1))
            if "eval_s" in last:  # every evaluation of the run (a resumed one: earlier ones too)
                trial.set_user_attr("eval_seconds", round(sum(m.get("eval_s", 0.0)
                                                              for m in history), 3))


def _read_metrics(out_dir: Path) -> list[dict[str, float]]:
    """``trainer.fit``'s metrics.jsonl: one line per eval of the run (resumed runs included)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    history = []
    for line in path.read_text().splitlines():
        try:
            history.append(json.loads(line))
        except ValueError:  # a line torn by a full disk or a kill: not an eval
            continue
    return history


def _curve(history: list[dict[str, float]]) -> dict[str, list[float]]:
    """The eval history as columns, rounded: compact enough for a user attribute. ``elapsed_s``
    (the fit's seconds up to the end of that eval, set-up excluded) and ``eval_s`` say what a
    trial stopped at that eval cost."""
    keys = ("step", "train_loss", "val_loss", "bleu", "lr", "elapsed_s", "eval_s")
    return {k: [round(float(m[k]), 6) for m in history] for k in keys
            if all(k in m for m in history)}


def _n_params(cfg: TrainConfig) -> int:
    """Non-embedding parameters (what the report calls "86 M"), counted on the meta device."""
    import torch

    from trainer.model import DecoderLM

    with torch.device("meta"):
        return DecoderLM(cfg.model, cfg.data.vocab_size, pad_id=0).param_counts()["non_embedding"]


def _enqueue_retry(trial: optuna.Trial, *, bounded: bool) -> bool:
    """Re-enqueue ``trial`` the way a stale trial is (same params, ``retry_history``), so it
    resumes from its checkpoint. ``bounded``: under the storage's retry limit (a failure
    that may repeat); otherwise always (an orderly stop such as SIGTERM). False when the
    limit is reached and no retry was queued."""
    storage = trial.storage
    stale_callback = getattr(storage, "get_heartbeat_stale_trial_callback", None)
    callback = stale_callback() if bounded and stale_callback is not None else None
    frozen = storage.get_trial(trial._trial_id)
    limit = getattr(callback, "_max_retry", None)  # Optuna keeps it private
    if limit is not None and len(frozen.system_attrs.get("retry_history", [])) >= limit:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        (callback or RetryHeartbeatStaleTrialCallback())(trial.study, frozen)
    return True


def _retry_word(retried: bool) -> str:
    return "retrying" if retried else "not retried (retry limit reached)"


def _disk_full(error: BaseException) -> bool:
    """True when the file system refused a write whatever the file: no space, quota
    exceeded, the file-size limit, read-only (``storage.errors.WRITE_ERRNOS``)."""
    cause = os_error_in(error)
    return cause is not None and cause.errno in WRITE_ERRNOS


def _run_dir_error(error: BaseException, out_dir: Path) -> str | None:
    """What went wrong when the trial's run directory was changed under it (a file or the
    directory deleted, the checkpoint manifest garbled); None for anything else."""
    if _disk_full(error):
        return None
    for e in error_chain(error):
        if isinstance(e, CheckpointError) and str(out_dir) in str(e):
            return str(e).splitlines()[0]
        if isinstance(e, OSError) and e.filename is not None and (
                Path(str(e.filename)) == out_dir or out_dir in Path(str(e.filename)).parents):
            return f"{e.filename}: {e.strerror or type(e).__name__}"
    return None


def _drop_checkpoints(out_dir: Path) -> None:
    """Checkpoints of a trial that will never resume are dead weight (GBs at report size);
    the metrics and config files stay."""
    for path in [*out_dir.glob("ckpt_*.pt"), *out_dir.glob(".ckpt_*.tmp"),
                 out_dir / "manifest.json"]:
        path.unlink(missing_ok=True)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
