"""P3: the same study slice with 1 and with N workers (one per GPU): trial-steps per hour.

The slice is ``--trials`` enqueued trials with fixed parameters (the report's three warm
starts of ``configs/search.yaml`` in turn: 12L/768, 16L/768, 12L/512), each cut to
``--max-steps`` optimiser steps and one evaluation, so every run does the same work whatever
the sampler would have drawn. For each worker count W (``--workers``, default 1 and every GPU
seen) a fresh study on a scratch PostgreSQL database gets the slice and W worker processes
(``search.worker.run_worker``, GPU i for worker i) run it. Throughput is measured from the
first trial's start to the last trial's end (Optuna's ``datetime_start`` / ``datetime_complete``),
so process start-up is left out::

    trial_steps_per_hour = sum(steps of finished trials) / (last end - first start) * 3600
    scaling = trial_steps_per_hour(W) / trial_steps_per_hour(1)     (target >= 1.9 for 2 GPUs,
                                                                     >= 3.8 for 4)

With ``--tiny`` (CPU) the small task of ``bench.pruning`` stands in and W CPU workers share
the machine's cores, which checks the plumbing, not the scaling.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any

from bench import common

log = logging.getLogger("bench.scaling")

TARGETS = {"2": 1.9, "4": 3.8}


def slice_config(args: Any, wd: Any, name: str, n_trials: int) -> Any:
    """The study: search.yaml (or the small task) with ``n_trials`` fixed trials enqueued."""
    from search.config import load_search_config, search_config_from_dict, search_config_to_dict

    if args.tiny:
        cfg = common.small_task_search(wd, name, pruner="none", n_trials=n_trials,
                                       max_steps=args.max_steps, eval_every=args.max_steps,
                                       eval_subset=4)
        raw = search_config_to_dict(cfg)
        warm = [{"optim.lr": 2e-3, "model.d_model": 64, "model.n_layers": 1}]
    else:
        raw = search_config_to_dict(load_search_config(common.REPO / "configs" / "search.yaml"))
        data, _ = common.data_overrides(args, wd)
        raw["overrides"] = {**raw["overrides"], **data}
        truncation = raw["truncation"]
        truncation.update(max_steps=args.max_steps, eval_every=args.max_steps,
                          eval_subset=args.eval_subset)
        truncation["overrides"] = {**truncation["overrides"], "train.eval_max_new_tokens": 32}
        warm = raw["enqueue"]
        raw["pruner"] = {"type": "none"}  # the same work in every run: nothing is pruned
    raw.update(name=name, n_trials=n_trials, timeout_s=None,
               enqueue=[warm[i % len(warm)] for i in range(n_trials)])
    return search_config_from_dict(raw)


def worker(name: str, url: str, gpu: int | None, index: int, amt_home: str,
           n_workers: int) -> None:
    os.environ["AMT_HOME"] = amt_home
    os.environ.setdefault("AMT_PROGRESS", "0")
    common.setup_logging()
    import torch

    from search.worker import run_worker

    # the host's cores shared out as `amt-search launch` does (OMP_NUM_THREADS per worker):
    # W workers with every core each slow each other's steps on the host side
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))

    run_worker(name, gpu=gpu, storage_url=url, worker_index=index)


def run_slice(args: Any, wd: Any, url: str, name: str, n_workers: int, gpus: list[int]
              ) -> dict[str, Any]:
    import optuna

    from search.study import create_study

    cfg = slice_config(args, wd, name, args.trials)
    create_study(cfg, url)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(name, url, gpus[i] if gpus else None, i,
                                              os.environ["AMT_HOME"], n_workers))
             for i in range(n_workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")
            and t.datetime_start is not None and t.datetime_complete is not None]
    if not done:
        states = [t.state.name for t in trials]
        return {"workers": n_workers, "error": f"no trial finished: {states}"}
    span = (max(t.datetime_complete.timestamp() for t in done if t.datetime_complete)
            - min(t.datetime_start.timestamp() for t in done if t.datetime_start))
    steps = sum(_steps(t) for t in done)
    return {"workers": n_workers, "gpus": gpus[:n_workers], "finished": len(done),
            "states": [t.state.name for t in trials], "trial_steps": steps,
            "span_s": round(span, 2),
            "trial_steps_per_hour": round(steps / span * 3600, 1) if span else None}


def _steps(t: Any) -> int:
    """Optimiser steps a finished trial trained: its result, else its last reported eval."""
    if t.user_attrs.get("steps"):
        return int(t.user_attrs["steps"])
    curve = t.user_attrs.get("curve") or {}
    return int((curve.get("step") or [0])[-1])


def main(argv: list[str] | None = None) -> int:
    p = common.parser("scaling", __doc__.split("\n")[0])
    p.add_argument("--storage", help="a PostgreSQL server URL for the scratch database "
                   "(default: 127.0.0.1:5432 if it answers, else the embedded server)")
    p.add_argument("--workers", default=None,
                   help="worker counts, comma-separated (default: 1 and every GPU; --tiny 1,2)")
    p.add_argument("--trials", type=int, default=None, help="trials in the slice (default 8)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimiser steps per trial (default 60; --tiny 6)")
    p.add_argument("--eval-subset", type=int, default=32, help="pairs per evaluation (32)")
    args = p.parse_args(argv)
    common.setup_logging()
    import torch

    n_gpus = torch.cuda.device_count()
    gpus = list(range(n_gpus))
    counts = [int(w) for w in args.workers.split(",")] if args.workers else (
        [1, 2] if args.tiny else sorted({1, n_gpus}))
    if args.tiny:
        gpus = []  # CPU workers: the plumbing, not the scaling
    elif max(counts) > n_gpus or n_gpus < 2:
        raise SystemExit(f"bench: error: scaling needs one GPU per worker and at least 2 "
                         f"({n_gpus} seen, --workers {counts})")
    args.trials = args.trials or (4 if args.tiny else 8)
    args.max_steps = args.max_steps or (6 if args.tiny else 60)
    wd = common.work_dir(args, "scaling")
    common.amt_home(wd)
    server, where = common.server_url(args.storage)
    from storage.urls import mask_url

    report = common.Report("scaling", args, {
        "slice": f"{args.trials} enqueued trials, {args.max_steps} steps + 1 eval each",
        "workers": counts, "gpus": gpus, "server": mask_url(server), "server_source": where,
        "formula": "sum(steps of finished trials) / (last datetime_complete - first "
                   "datetime_start) * 3600",
    })
    dbs = common.ScratchDatabases(server, ["scaling"])
    runs: list[dict[str, Any]] = []
    report["runs"] = runs
    try:
        for w in counts:
            log.info("%d worker(s) on the slice ...", w)
            runs.append(run_slice(args, wd, dbs.url("scaling"), f"scaling-{w}-{dbs.tag}", w,
                                  gpus))
            log.info("%s", runs[-1])
            report.save()
    finally:
        dbs.drop()
    base = next((r.get("trial_steps_per_hour") for r in runs if r["workers"] == 1), None)
    verdict: dict[str, Any] = {"targets": TARGETS}
    for r in runs:
        if r["workers"] > 1 and base and r.get("trial_steps_per_hour"):
            ratio = round(r["trial_steps_per_hour"] / base, 3)
            verdict[f"scaling_{r['workers']}"] = ratio
            if str(r["workers"]) in TARGETS and gpus:
                verdict[f"scaling_{r['workers']}_met"] = ratio >= TARGETS[str(r["workers"])]
    report["verdict"] = verdict
    report.finish("ok" if all("error" not in r for r in runs) else "partial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
