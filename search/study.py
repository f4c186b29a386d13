"""Create and load studies. The whole search config lives with the study in the database.

``create_study`` stores the validated :class:`~search.config.SearchConfig` (base recipe
included) as a study system attribute, so a worker anywhere needs only the study name and
the storage URL; ``load_study`` rebuilds the sampler and pruner from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy

from search.config import (
    SearchConfig,
    check_combinations,
    full_run_dict,
    search_config_from_dict,
    search_config_to_dict,
    trial_train_config,
)
from search.errors import SearchError
from storage import mask_url, open_storage
from storage.urls import connect_error
from trainer.config import config_from_dict

__all__ = [
    "CONFIG_ATTR",
    "CORPUS_ATTR",
    "pinned_corpus",
    "TrialCounts",
    "changed_keys",
    "count_trials",
    "create_study",
    "delete_study",
    "load_study",
    "make_pruner",
    "pruner_min_resource",
    "make_sampler",
    "next_action",
    "open_worker_storage",
]

log = logging.getLogger(__name__)

CONFIG_ATTR = "amt_search:config"  # study system attribute holding search_config_to_dict(cfg)
CORPUS_ATTR = "amt_search:corpus"  # a file corpus's signature (trainer.data.corpus_signature)
MAX_CONFIG_BYTES = 1_000_000


def create_study(
    search_cfg: SearchConfig,
    storage_url: str | None = None,
    study_name: str | None = None,
    skip_if_exists: bool = False,
) -> optuna.Study:
    """Create the schema and the study, store the config, enqueue ``search_cfg.enqueue``.

    The enqueued warm starts become trials 0, 1, 2 ... and run before any sampled trial.

    Raises:
        SearchError: the study exists (unless ``skip_if_exists``: then it is returned as it
            is, nothing enqueued again).
        StorageError: the storage cannot be opened.
    """
    cfg = search_cfg if study_name is None else dataclasses.replace(search_cfg, name=study_name)
    from trainer.data.corpus import check_corpus  # (imports torch: not for every command)
    from trainer.metrics import resolve_tokenize

    trial_cfg = trial_train_config(cfg, {}, out_dir=".")
    full_steps = config_from_dict(full_run_dict(cfg, {})).train.max_steps
    if trial_cfg.train.max_steps > full_steps:
        log.warning("truncation.max_steps=%d is more than the full run's train.max_steps=%d "
                    "(%s): each trial would train longer than the run it stands for",
                    trial_cfg.train.max_steps, full_steps, cfg.base_config)
    bad, example = check_combinations(cfg)
    if bad == 256:
        raise SearchError(f"space: none of 256 random points is a valid combination (e.g. "
                          f"{example}): each value is valid alone, not together; narrow the "
                          "ranges")
    if bad:
        log.warning("space: %d of 256 random points are invalid combinations (e.g. %s); such "
                    "trials fail (invalid_params) and the worker draws again", bad, example)
    searched = {p.name for p in cfg.space}
    for key, rule in (("model.n_heads", "derive.head_dim"), ("model.d_ff", "derive.ffn_ratio")):
        if key in cfg.overrides and "model.d_model" in searched:
            log.warning("overrides.%s=%s holds for every searched model.d_model: %s is not "
                        "used for it", key, cfg.overrides[key], rule)
    idle = pruner_never_prunes(cfg)
    if idle:
        log.warning("pruner: %s", idle)
    corpus = check_corpus(trial_cfg.data)  # here, not in the first trial
    resolve_tokenize(trial_cfg.eval.bleu_tokenize, [])  # a tokeniser this host can run
    stored = search_config_to_dict(cfg)
    try:
        size = len(json.dumps(stored))  # what the database will hold
    except (TypeError, ValueError) as e:
        raise SearchError(f"the search config cannot be stored: {e}") from None
    if size > MAX_CONFIG_BYTES:
        raise SearchError(f"the search config is {size:,} bytes as JSON, more than "
                          f"{MAX_CONFIG_BYTES:,}: keep meta and overrides small")
    from search.objective import check_run_dirs
    from storage.rdb import url_identity

    identity = url_identity(storage_url)  # before anything is created: the study's workers
    if identity is not None:  # would refuse to run (another database's study of this name
        check_run_dirs(cfg.name, identity)  # ran here)
    storage = _open(storage_url, cfg)
    with _creation_lock(storage, cfg.name):  # a concurrent create-study waits, then sees it
        return _create(storage, cfg, storage_url, stored, skip_if_exists, corpus)


@contextlib.contextmanager
def _creation_lock(storage: Any, name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock per study name, held while a study is created: a second
    create-study of the name never mistakes one being made for a half-made one. The session
    holds it, so a killed create-study releases it."""
    key = zlib.crc32(f"amt-search:create:{name}".encode())
    try:
        conn = storage.engine.connect()
        conn.execute(sqlalchemy.text("SET lock_timeout = 0"))  # wait as long as it takes
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
    except sqlalchemy.exc.DBAPIError as e:
        raise connect_error(storage.url, e) from None
    try:
        yield
    finally:
        with contextlib.suppress(sqlalchemy.exc.DBAPIError):  # closing ends the session too
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        conn.close()


def _create(storage: Any, cfg: SearchConfig, storage_url: str | None, stored: dict[str, Any],
            skip_if_exists: bool, corpus: dict[str, Any] | None = None) -> optuna.Study:
    for attempt in range(2):
        try:
            study = optuna.create_study(
                study_name=cfg.name,
                storage=storage,
                direction=cfg.direction,
                sampler=make_sampler(cfg),
                pruner=make_pruner(cfg),
            )
            break
        except optuna.exceptions.DuplicatedStudyError:
            if attempt == 0 and _half_made(storage, cfg.name):
                log.warning("study %s was left half-made by an interrupted create-study: "
                            "making it again", cfg.name)
                optuna.delete_study(study_name=cfg.name, storage=storage)
                continue
            if skip_if_exists:
                study, existing = load_study(cfg.name, storage)
                changed = changed_keys(search_config_to_dict(existing), stored,
                                       ignore=("name",))
                if changed:
                    log.warning(
                        "study %s exists with another configuration (%s differ%s): it is "
                        "left as it is and runs its stored one; to search the new one, use "
                        "another --study-name or delete the study (amt-search delete-study)",
                        cfg.name, ", ".join(changed[:5]), ", ..." if len(changed) > 5 else "")
                else:
                    log.info("study %s exists: left as it is (--skip-if-exists)", cfg.name)
                return study
            raise SearchError(
                f"study '{cfg.name}' already exists ({_where(storage_url)}) — pick another "
                "--study-name, reuse it (create-study --skip-if-exists), or delete it: "
                f"amt-search delete-study --study {cfg.name}"
                + (" --storage URL" if storage_url else "")
            ) from None
    try:
        for params in cfg.enqueue:
            study.enqueue_trial(dict(params), user_attrs={"warm_start": True})
        if corpus is not None:  # the files' pairs: a worker refuses them changed
            storage.set_study_system_attr(study._study_id, CORPUS_ATTR, corpus)
        # last: a study with its config is complete (workers and --skip-if-exists rely on it)
        storage.set_study_system_attr(study._study_id, CONFIG_ATTR, stored)
    except BaseException:
        with contextlib.suppress(Exception):
            optuna.delete_study(study_name=cfg.name, storage=storage)
        raise
    log.info(
        "created study %s (%s): %d parameters, %d warm starts enqueued",
        cfg.name,
        _where(storage_url),
        len(cfg.space),
        len(cfg.enqueue),
    )
    return study


def changed_keys(old: Any, new: Any, ignore: tuple[str, ...] = (), prefix: str = ""
                 ) -> list[str]:
    """Dotted keys whose values differ between two nested configs; top-level keys in
    ``ignore`` are left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new), key=str)
                if not (prefix == "" and key in ignore)
                for k in changed_keys(old.get(key), new.get(key), (), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def pinned_corpus(study: optuna.Study) -> dict[str, Any]:
    """The file corpus's signature create-study stored (``trainer.data.corpus_signature``;
    empty for the Bible or a study made before corpora were pinned)."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return dict(attrs.get(CORPUS_ATTR) or {})


def _half_made(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """The study has no stored config and no trial has started: a create-study that died
    between creating the study and storing its config (the last thing it does)."""
    study_id = storage.get_study_id_from_name(name)
    if CONFIG_ATTR in storage.get_study_system_attrs(study_id):
        return False
    return all(t.state == optuna.trial.TrialState.WAITING
               for t in storage.get_all_trials(study_id, deepcopy=False))


def load_study(
    name: str | None,
    storage: str | optuna.storages.BaseStorage | None = None,
    *,
    worker_index: int = 0,
) -> tuple[optuna.Study, SearchConfig]:
    """The study ``name`` with its sampler (seeded ``seed + worker_index``) and pruner.

    ``storage`` is a URL (None: ``$AMT_STORAGE_URL`` or the embedded server) or an open
    storage, e.g. from :func:`open_worker_storage`. ``name`` None: the storage's only
    amt-search study.

    Raises:
        SearchError: no such study (the message lists the existing ones), none or several
            when ``name`` is None, or the study was not made by ``amt-search create-study``
            (no stored config).
    """
    rdb = (storage if isinstance(storage, optuna.storages.BaseStorage)
           else open_storage(storage, create=False))
    name = name if name is not None else _only_study(rdb)
    cfg = _stored_config(rdb, name)
    # a restarted worker (same index) must not draw the trials it drew before: the seed also
    # counts the study's trials (a fresh study's are its warm starts, so a run is repeatable)
    n_trials = rdb.get_n_trials(rdb.get_study_id_from_name(name))
    study = optuna.load_study(
        study_name=name,
        storage=rdb,
        sampler=make_sampler(cfg, worker_index, n_trials),
        pruner=make_pruner(cfg),
    )
    return study, cfg


def open_worker_storage(name: str, storage_url: str | None = None) -> Any:
    """The storage opened with study ``name``'s heartbeat interval and grace period."""
    return _open(storage_url, _stored_config(open_storage(storage_url, create=False), name))


def _only_study(rdb: Any) -> str:
    """The name of the storage's one amt-search study (for commands given no --study).

    Raises:
        SearchError: none, or several (the message lists them).
    """
    names = sorted(s.study_name for s in rdb.get_all_studies() if CONFIG_ATTR in s.system_attrs)
    if len(names) == 1:
        return names[0]
    where = mask_url(str(rdb.url))
    if not names:
        raise SearchError(f"no study in {where} — create one with 'amt-search create-study'")
    raise SearchError(f"--study is needed: {where} holds {len(names)} studies: "
                      + ", ".join(names))


def _require_study(rdb: Any, name: str) -> None:
    """SearchError listing the storage's studies when ``name`` is not one of them."""
    names = sorted(s.study_name for s in rdb.get_all_studies())
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise SearchError(
            f"no study named '{name}' in the storage (studies: {known}) — "
            "create it with 'amt-search create-study'"
        )


def _stored_config(rdb: optuna.storages.BaseStorage, name: str) -> SearchConfig:
    _require_study(rdb, name)
    attrs = rdb.get_study_system_attrs(rdb.get_study_id_from_name(name))
    if CONFIG_ATTR not in attrs:
        raise SearchError(
            f"study '{name}' has no amt-search config (not made by 'amt-search create-study')"
        )
    return search_config_from_dict(attrs[CONFIG_ATTR], stored=True)


def make_sampler(cfg: SearchConfig, worker_index: int = 0, n_trials: int = 0
                 ) -> optuna.samplers.BaseSampler:
    """The sampler of ``cfg``, seeded ``seed + worker_index`` (plus a multiple of the
    ``n_trials`` the study holds beyond its warm starts)."""
    s = cfg.sampler
    extra = max(n_trials - len(cfg.enqueue), 0) * 1_000_003
    seed = None if s.seed is None else (s.seed + worker_index + extra) % 2**32
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate and constant_liar are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=s.multivariate,
            constant_liar=s.constant_liar,
            n_startup_trials=s.n_startup_trials,
        )


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    """Pruners count resources in evaluations: a trial's k-th eval is reported at step k."""
    p = cfg.pruner
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=pruner_min_resource(cfg),
            max_resource=cfg.pruner_max_resource,
            reduction_factor=p.reduction_factor,
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=pruner_min_resource(cfg), reduction_factor=p.reduction_factor
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_evals
        )
    return optuna.pruners.NopPruner()


def pruner_min_resource(cfg: SearchConfig) -> int:
    """``pruner.min_resource``, or with 0 (the default) a third of the evals a trial makes,
    rounded down, at least 1 and at most ``max_resource``: before that BLEU-4 does not rank
    configurations (BENCHMARKS.md, P5)."""
    if cfg.pruner.min_resource:
        return cfg.pruner.min_resource
    return max(1, min(cfg.truncation.n_evals // 3, cfg.pruner_max_resource))


def pruner_never_prunes(cfg: SearchConfig) -> str | None:
    """Why the configured pruner can never stop a trial before its last eval (what to
    change), or None. A pruner that only acts at the last eval saves nothing."""
    p, n_evals = cfg.pruner, cfg.truncation.n_evals
    if p.type in ("hyperband", "successive_halving") and pruner_min_resource(cfg) >= n_evals:
        return (f"{p.type} can never stop a trial early: its first rung is at eval "
                f"{pruner_min_resource(cfg)} and a trial makes {_evals(n_evals)}; lower "
                "pruner.min_resource or evaluate more often (truncation.eval_every)")
    if p.type == "median" and p.n_warmup_evals >= n_evals:
        return (f"median can never stop a trial early: pruner.n_warmup_evals="
                f"{p.n_warmup_evals} and a trial makes {_evals(n_evals)}; lower it")
    if p.type == "median" and cfg.n_trials is not None and p.n_startup_trials >= cfg.n_trials:
        return (f"median can never stop a trial: pruner.n_startup_trials={p.n_startup_trials} "
                f"and the study runs n_trials={cfg.n_trials}; lower it")
    return None


def _evals(n: int) -> str:
    return f"{n} eval" if n == 1 else f"{n} evals"


def _open(storage_url: str | None, cfg: SearchConfig) -> Any:
    return open_storage(
        storage_url,
        heartbeat_interval=cfg.heartbeat_interval_s,
        grace_period=cfg.grace_period_s,
    )


def _where(storage_url: str | None) -> str:
    from storage import resolve_url

    return mask_url(resolve_url(storage_url))


def next_action(study: optuna.Study, cfg: SearchConfig) -> str:
    """``run`` a trial, ``wait`` (the last trials run elsewhere and may need a retry) or
    ``done``."""
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    if cfg.timeout_s is not None:
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        if starts and _elapsed_s(min(starts)) >= cfg.timeout_s:
            log.info("study timeout (%.0f s since its first trial) reached", cfg.timeout_s)
            if counts.waiting:
                log.warning(
                    "%d trial(s) wait to run (retries of stopped trials, warm starts) and will "
                    "not start: the study's timeout_s (%.0f s) has passed since its first trial",
                    counts.waiting, cfg.timeout_s)
            return "done"
    if counts.waiting:
        return "run"
    if cfg.n_trials is None or counts.started < cfg.n_trials:
        return "run"
    return "done" if counts.finished >= cfg.n_trials else "wait"


def _elapsed_s(start: datetime.datetime) -> float:
    return (datetime.datetime.now() - start).total_seconds()


@dataclass(frozen=True)
class TrialCounts:
    """Trials of a study counted once per retry chain.

    A trial that failed and was retried (stale heartbeat, SIGTERM) is *superseded* by its
    retry and not counted; the chain counts with its newest member's state.
    """

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def total(self) -> int:
        """Retry chains: every trial once, however often it was retried."""
        return self.complete + self.pruned + self.failed + self.running + self.waiting

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def started(self) -> int:
        """Finished + running: what counts against ``n_trials`` when deciding to start one."""
        return self.finished + self.running


def count_trials(trials: list[optuna.trial.FrozenTrial]) -> TrialCounts:
    superseded = {
        t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")
    }
    states = [t.state for t in trials if t.number not in superseded]
    s = optuna.trial.TrialState
    return TrialCounts(
        complete=states.count(s.COMPLETE),
        pruned=states.count(s.PRUNED),
        failed=states.count(s.FAIL),
        running=states.count(s.RUNNING),
        waiting=states.count(s.WAITING),
    )


@dataclass(frozen=True)
class Deleted:
    """What :func:`delete_study` removed (or, with ``dry_run``, would remove)."""

    study: str
    trials: int
    run_dirs: list[str]  # the trials' run directories
    run_bytes: int
    kept: list[str]  # promoted full runs (full-trial-*), never deleted here


def delete_study(name: str, storage_url: str | None = None, *, keep_runs: bool = False,
                 force: bool = False, dry_run: bool = False) -> Deleted:
    """Delete the study ``name`` (every trial, its stored config) and, unless ``keep_runs``,
    its trials' run directories under ``$AMT_HOME/runs/<name>`` when they are this study's
    (the directory's owner file names this database and study). Promoted full runs
    (``full-trial-*``) are kept: they are trained models.

    Raises:
        SearchError: no such study; or trials are RUNNING (workers at work) and not ``force``.
    """
    import shutil

    from search.objective import OWNER_FILE, check_run_dirs
    from storage.paths import state_dir
    from storage.rdb import storage_identity

    backend: Any = open_storage(storage_url, create=False)
    _require_study(backend, name)  # (its stored config is not read: a study whose config no
    # longer loads, or one not made by amt-search, can be deleted too)
    study = optuna.load_study(study_name=name, storage=backend)
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    if running and not force:
        raise SearchError(
            f"study '{name}' has {len(running)} running trial(s) ({_numbers(running)}): stop "
            "its workers first (Ctrl-C the launch), or pass --force (a trial of a worker "
            "that died stays RUNNING until its grace period ends)")
    root = state_dir() / "runs" / name
    try:  # the run directories are this study's: its database and its id
        owner = check_run_dirs(name, storage_identity(backend))
        ours = isinstance(owner, dict) and owner.get("study_id") == study._study_id
    except SearchError:  # another database's study of this name
        ours = False
    dirs = sorted(d for d in root.glob("trial-*") if d.is_dir() and not d.is_symlink()
                  ) if ours and not keep_runs else []
    size = sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())
    kept = [str(d) for d in sorted(root.glob("full-trial-*"))]
    left = [] if ours or keep_runs else sorted(root.glob("trial-*"))
    if left:
        kept.append(f"{root}/trial-* ({len(left)}: not marked as this study's, left alone)")
    result = Deleted(name, len(trials), [str(d) for d in dirs], size, kept)
    if dry_run:
        return result
    optuna.delete_study(study_name=name, storage=storage)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if ours and not keep_runs:
        (root / OWNER_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # empty: no full run kept
    log.info("deleted study %s (%d trials) from %s; %d run directories (%.1f MB) removed",
             name, len(trials), _where(storage_url), len(dirs), size / 1e6)
    return result


def _numbers(values: list[int]) -> str:
    shown = ", ".join(map(str, values[:8]))
    return shown + (", ..." if len(values) > 8 else "")
