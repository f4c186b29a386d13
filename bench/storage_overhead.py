"""P4: per-trial storage + sampler time of our storage against plain Optuna, same run.

Variants, each on its own fresh PostgreSQL database (made on ``--storage``'s server, else the
local server at 127.0.0.1:5432, else the embedded one; dropped at the end):

* ``plain``: ``optuna.storages.RDBStorage(url)`` with Optuna's defaults;
* ``ours``: ``storage.open_storage(url)`` with the search's settings (heartbeat 60 s, grace
  180 s, stale-trial retries, pool_pre_ping, sized pools, keepalives, server timeouts,
  retries with backoff, the duplicate-proof trial creation);
* ``worker_loop`` (``--loop-workers``): our whole ``search.worker.run_worker`` loop around the
  same objective (stale-trial check, start lock, budget check, one ``optimize`` per trial).

Every variant runs the same trivial objective (3 suggested parameters, 6 ``trial.report`` +
``trial.should_prune`` calls, no sleep), the search's sampler and pruner
(``configs/search.yaml``: multivariate TPE with constant liar, seeded ``1234 + worker index``;
Hyperband over 6 evaluations) in N concurrent worker processes (``--workers``, default
1, 8, 32), each with ``--trials`` / N trials on a fresh study. The workers start together
(a barrier after opening the storage and loading the study), so imports and connection set-up
are not counted. Per-trial time = a worker's wall time over its trials, averaged over the
workers: with a trivial objective it is all storage, sampler and pruner time.
Each variant runs ``--rounds`` times per worker count, alternating the order; the fastest
round counts (the machine may be shared). ratio = ours / plain (target <= 1.2).

Ask latency: one study filled with 1k and then 5k finished trials (3 parameters and 6
intermediate values each); on it, median ``study.ask()`` and ``ask()`` + the 3 suggestions
(the sampler's work), through both storages.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import multiprocessing as mp
import statistics
import time
import warnings
from typing import Any

from bench import common

log = logging.getLogger("bench.storage_overhead")

TARGET_RATIO = 1.2
N_REPORTS = 6


def objective(trial: Any) -> float:
    """Trivial: three parameters, six reports with a pruning check after each."""
    import optuna

    lr = trial.suggest_float("optim.lr", 5e-5, 1e-3, log=True)
    layers = trial.suggest_int("model.n_layers", 6, 16, step=2)
    dropout = trial.suggest_float("model.dropout", 0.0, 0.3)
    score = 30.0 - 5 * abs(math.log10(lr) + 3.5) - abs(layers - 12) / 2 - 10 * dropout
    value = 0.0
    for k in range(1, N_REPORTS + 1):
        value = score * (1 - 0.5**k)
        trial.report(value, k)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def search_config(name: str, n_trials: int) -> Any:
    """``configs/search.yaml`` (its sampler, pruner and heartbeat) as study ``name``."""
    from search.config import load_search_config

    cfg = load_search_config(common.REPO / "configs" / "search.yaml")
    return dataclasses.replace(cfg, name=name, n_trials=n_trials, enqueue=(), timeout_s=None)


def open_variant(variant: str, url: str, cfg: Any) -> Any:
    import optuna

    if variant == "plain":
        return optuna.storages.RDBStorage(url)
    from storage import open_storage

    return open_storage(url, heartbeat_interval=cfg.heartbeat_interval_s,
                        grace_period=cfg.grace_period_s)


def worker(variant: str, url: str, study_name: str, index: int, n_trials: int,
           barrier: Any, queue: Any) -> None:
    """One worker process: open, load, wait for the others, run ``n_trials`` trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = search_config(study_name, 10**6)
    if variant == "worker_loop":
        _run_worker_loop(url, study_name, index, n_trials, barrier, queue)
        return
    from search.study import make_pruner, make_sampler

    storage = open_variant(variant, url, cfg)
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=make_sampler(cfg, index), pruner=make_pruner(cfg))
    ends: list[float] = []
    barrier.wait()
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n_trials,
                   callbacks=[lambda s, t: ends.append(time.perf_counter())])
    queue.put({"index": index, "wall_s": time.perf_counter() - t0, "trials": n_trials,
               "trial_s": [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]})


def _run_worker_loop(url: str, study_name: str, index: int, n_trials: int, barrier: Any,
                     queue: Any) -> None:
    """``search.worker.run_worker`` with the trivial objective in place of training."""
    import search.worker

    ends: list[float] = []
    started: list[float] = []

    class TrivialObjective:
        def __init__(self, cfg: Any, stop: Any, device: str) -> None:
            self.on_trial_start: list[Any] = []
            self.lost = None  # what run_worker reads of search.objective.Objective
            self.invalid_in_a_row = 0
            barrier.wait()  # run_worker has opened the storage and loaded the study
            started.append(time.perf_counter())

        def __call__(self, trial: Any) -> float:
            for fn in self.on_trial_start:
                fn(trial)
            try:
                return objective(trial)
            finally:
                ends.append(time.perf_counter())

    search.worker.Objective = TrivialObjective  # type: ignore[misc,assignment]
    # no run directories (the trivial objective writes none), and every round reuses the study
    # name on a fresh database: nothing to claim
    search.worker.claim_run_dirs = lambda *args: None  # type: ignore[assignment]
    search.worker.run_worker(study_name, gpu=None, storage_url=url, n_trials=n_trials,
                             worker_index=index)
    t0 = started[0]
    queue.put({"index": index, "wall_s": time.perf_counter() - t0, "trials": len(ends),
               "trial_s": [b - a for a, b in zip([t0, *ends[:-1]], ends, strict=True)]})


def run_concurrent(variant: str, url: str, n_workers: int, per_worker: int, name: str
                   ) -> dict[str, Any]:
    """A fresh study ``name``, ``n_workers`` processes of ``per_worker`` trials each.

    Every variant uses the same study name (in its own database): Hyperband assigns brackets
    by a hash of the study name and trial number, so the pruning, and with it the work, match.
    """
    import optuna

    cfg = search_config(name, n_workers * per_worker)
    if variant == "worker_loop":
        from search.study import create_study

        create_study(cfg, url)
    else:
        optuna.create_study(study_name=name, storage=open_variant(variant, url, cfg),
                            direction="maximize")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_workers)
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(variant, url, name, i, per_worker, barrier, queue))
             for i in range(n_workers)]
    for proc in procs:
        proc.start()
    rows = [queue.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    per_trial = [r["wall_s"] / max(r["trials"], 1) for r in rows]
    all_trials = [t for r in rows for t in r["trial_s"]]
    counts = _states(optuna.load_study(study_name=name, storage=url))
    return {
        "workers": n_workers, "trials": sum(r["trials"] for r in rows),
        "per_trial_ms_mean": round(1000 * statistics.fmean(per_trial), 2),
        "trial_ms_p50": round(1000 * common.median(all_trials), 2),
        "trial_ms_p95": round(1000 * _quantile(all_trials, 0.95), 2),
        "trials_per_s": round(sum(r["trials"] for r in rows) / max(r["wall_s"] for r in rows), 1),
        "states": counts,
    }


def fill(url: str, study_name: str, total: int) -> float:
    """Add finished trials (3 parameters, 6 intermediate values, a value) until the study holds
    ``total``; returns the seconds it took.

    Written in bulk through Optuna's own table models (``add_trial`` commits one trial at a
    time, ~30 ms each here); the filled study is read back through the public API.
    """
    import random

    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json
    from optuna.storages._rdb import models
    from sqlalchemy.orm import Session

    storage = optuna.storages.RDBStorage(url)
    study_id = storage.get_study_id_from_name(study_name)
    have = len(storage.get_all_trials(study_id, deepcopy=False))
    dists = {"optim.lr": FloatDistribution(5e-5, 1e-3, log=True),
             "model.n_layers": IntDistribution(6, 16, step=2),
             "model.dropout": FloatDistribution(0.0, 0.3)}
    as_json = {name: distribution_to_json(d) for name, d in dists.items()}
    finite_value = models.TrialValueModel.TrialValueType.FINITE
    finite_step = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    rng = random.Random(have)
    t0 = time.perf_counter()
    now = datetime.datetime.now()
    with Session(storage.engine) as session:
        for number in range(have, total):
            params = {"optim.lr": 10 ** rng.uniform(math.log10(5e-5), -3),
                      "model.n_layers": rng.randrange(6, 17, 2),
                      "model.dropout": rng.uniform(0, 0.3)}
            steps = [rng.uniform(0, 30) for _ in range(N_REPORTS)]
            trial = models.TrialModel(number=number, study_id=study_id,
                                      state=optuna.trial.TrialState.COMPLETE)
            trial.datetime_start = trial.datetime_complete = now
            session.add(trial)
            session.add_all([models.TrialParamModel(
                trial=trial, param_name=name, param_value=dists[name].to_internal_repr(v),
                distribution_json=as_json[name]) for name, v in params.items()])
            session.add(models.TrialValueModel(trial=trial, objective=0, value=steps[-1],
                                               value_type=finite_value))
            session.add_all([models.TrialIntermediateValueModel(
                trial=trial, step=k + 1, intermediate_value=v, intermediate_value_type=finite_step)
                for k, v in enumerate(steps)])
            if number % 1000 == 999:
                session.commit()
        session.commit()
    trials = storage.get_all_trials(study_id, deepcopy=False)
    if len(trials) != total or set(trials[-1].params) != set(dists):
        raise RuntimeError(f"filling study {study_name} went wrong: {len(trials)} trials")
    storage.engine.dispose()
    return time.perf_counter() - t0


def ask_latency(variant: str, url: str, study_name: str, repeats: int) -> dict[str, float]:
    """Median ms of ``ask()``, ``ask()`` + 3 suggestions, and ``tell()`` (after 2 warm-ups)."""
    import optuna

    from search.study import make_pruner, make_sampler

    cfg = search_config(study_name, 10**6)
    study = optuna.load_study(study_name=study_name, storage=open_variant(variant, url, cfg),
                              sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # ask/tell by design
    ask, ask_suggest, tell = [], [], []
    for r in range(repeats + 2):
        t0 = time.perf_counter()
        trial = study.ask()
        t1 = time.perf_counter()
        trial.suggest_float("optim.lr", 5e-5, 1e-3, log=True)
        trial.suggest_int("model.n_layers", 6, 16, step=2)
        trial.suggest_float("model.dropout", 0.0, 0.3)
        t2 = time.perf_counter()
        study.tell(trial, 1.0)
        t3 = time.perf_counter()
        if r >= 2:
            ask.append(t1 - t0)
            ask_suggest.append(t2 - t0)
            tell.append(t3 - t2)
    return {"ask_ms": round(1000 * common.median(ask), 2),
            "ask_suggest_ms": round(1000 * common.median(ask_suggest), 2),
            "tell_ms": round(1000 * common.median(tell), 2)}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("storage_overhead", __doc__.split("\n")[0])
    p.add_argument("--storage", help="a PostgreSQL server URL to make scratch databases on "
                   "(default: 127.0.0.1:5432 if it answers, else the embedded server)")
    p.add_argument("--workers", default=None, help="concurrent workers (default 1,8,32; "
                   "--tiny 1,2)")
    p.add_argument("--loop-workers", default=None,
                   help="worker counts for the worker_loop variant (default 1,8; --tiny 1; "
                   "'' for none); each of its processes imports torch")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per run, split over the workers (default 128; --tiny 8)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of each variant per worker count, alternating; the fastest counts"
                   " (default 2; --tiny 1)")
    p.add_argument("--study-sizes", default=None,
                   help="study sizes for the ask latency (default 1000,5000; --tiny 20,60)")
    p.add_argument("--repeats", type=int, default=None,
                   help="asks timed per size and variant (default 30; --tiny 3)")
    args = p.parse_args(argv)
    common.setup_logging()
    workers = _ints(args.workers) or ([1, 2] if args.tiny else [1, 8, 32])
    loop_spec = args.loop_workers if args.loop_workers is not None else (
        "1" if args.tiny else "1,8")
    loop_workers = _ints(loop_spec)
    trials = args.trials or (8 if args.tiny else 128)
    sizes = _ints(args.study_sizes) or ([20, 60] if args.tiny else [1000, 5000])
    repeats = args.repeats or (3 if args.tiny else 30)
    rounds = args.rounds or (1 if args.tiny else 2)

    server, where = common.server_url(args.storage)
    from storage.urls import mask_url

    report = common.Report("storage_overhead", args, {
        "server": mask_url(server), "server_source": where, "workers": workers,
        "worker_loop_workers": loop_workers, "trials_per_run": trials, "rounds": rounds,
        "objective": f"3 suggestions, {N_REPORTS} report + should_prune, no sleep",
        "sampler_pruner": "configs/search.yaml: TPE multivariate constant_liar seed 1234+i, "
                          "Hyperband", "study_sizes": sizes, "ask_repeats": repeats,
        "heartbeat": "ours: 60 s, grace 180 s (configs/search.yaml)",
    })
    dbs = common.ScratchDatabases(server, ["plain", "ours", "loop"])
    log.info("scratch databases %s on %s", ", ".join(dbs.names.values()), mask_url(server))
    try:
        _run(report, dbs, workers, loop_workers, trials, rounds, sizes, repeats)
    finally:
        dbs.drop()
    report.finish()
    return 0


def _run(report: common.Report, dbs: common.ScratchDatabases, workers: list[int],
         loop_workers: list[int], trials: int, rounds: int, sizes: list[int], repeats: int
         ) -> None:
    import optuna

    from storage import create_schema

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    urls = {"plain": dbs.url("plain"), "ours": dbs.url("ours"), "worker_loop": dbs.url("loop")}
    optuna.storages.RDBStorage(urls["plain"]).engine.dispose()  # tables made once, no race
    create_schema(urls["ours"])
    create_schema(urls["worker_loop"])
    concurrency: list[dict[str, Any]] = []
    ratios: dict[str, Any] = {}
    report["concurrency"] = concurrency
    report["ratio_ours_vs_plain"] = ratios
    for n in workers:
        per_worker = max(2, trials // n)
        variants = ["plain", "ours"] + (["worker_loop"] if n in loop_workers else [])
        best: dict[str, float] = {}
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # balance drift
            for variant in order:
                log.info("%s: %d workers x %d trials (round %d) ...", variant, n, per_worker,
                         r + 1)
                row = run_concurrent(variant, urls[variant], n, per_worker, f"overhead-{n}-r{r}")
                concurrency.append({"variant": variant, "round": r + 1, **row})
                ms = row["per_trial_ms_mean"]
                best[variant] = min(best.get(variant, math.inf), ms)
                log.info("%s, %d workers: %.1f ms per trial", variant, n, ms)
                report.save()
        ratios[str(n)] = {v: round(best[v] / best["plain"], 3) for v in variants if v != "plain"}
        ratios[str(n)]["per_trial_ms_best"] = best
        report.save()

    name = f"asklatency-{dbs.tag}"
    optuna.create_study(study_name=name, storage=urls["ours"], direction="maximize")
    latency: list[dict[str, Any]] = []
    report["ask_latency"] = latency
    for size in sizes:
        fill_s = fill(urls["ours"], name, size)
        log.info("study filled to %d trials (%.1f s)", size, fill_s)
        for variant in ("plain", "ours"):
            medians = ask_latency(variant, urls["ours"], name, repeats)
            latency.append({"study_trials": size, "variant": variant, **medians})
            log.info("ask latency, %s, %d trials: %s", variant, size, medians)
            report.save()
    worst = max(row["ours"] for row in ratios.values())
    report["verdict"] = {"target_ratio": TARGET_RATIO, "worst_ratio_ours": worst,
                         "met": worst <= TARGET_RATIO}


def _states(study: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


if __name__ == "__main__":
    raise SystemExit(main())
