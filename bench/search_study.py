"""Issue 4's GPU must-show: the report-shaped study (``configs/search.yaml``) on a short budget.

The study is ``configs/search.yaml`` as it is (space, TPE, Hyperband, the report's three warm
starts, the report's recipe per trial) with a shorter truncation budget and fewer trials:
``--n-trials``, ``--max-steps``, ``--eval-every``, ``--eval-subset``, ``--timeout-s`` (no
trial starts after it), and trial-only ``--grad-accum`` / ``--eval-max-new-tokens``. It
creates the study on a fresh database, runs ``amt-search launch`` (one worker per GPU, or
``--cpu-workers K``), and reports the leaderboard, the trial counts, the best trial,
GPU-seconds spent and the wall time. ``--tiny``: the quickstart's tiny model on a synthetic
corpus, a CPU smoke test.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from bench import common

log = logging.getLogger("bench.search_study")


def main(argv: list[str] | None = None) -> int:
    p = common.parser("search_study", __doc__.split("\n")[0])
    p.add_argument("--storage", help="PostgreSQL server for the scratch database "
                   "(default: 127.0.0.1:5432 when it answers, else the embedded one)")
    p.add_argument("--gpus", default="all", help="'all' or indices 0,1 (default all)")
    p.add_argument("--cpu-workers", type=int, default=0, help="K CPU workers instead of GPUs")
    p.add_argument("--n-trials", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=60, help="truncation: optimiser steps")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-subset", type=int, default=200)
    p.add_argument("--timeout-s", type=float, default=360.0)
    p.add_argument("--grad-accum", type=int, help="truncation override of train.grad_accum")
    p.add_argument("--eval-max-new-tokens", type=int,
                   help="truncation override of train.eval_max_new_tokens")
    args = p.parse_args(argv)
    common.setup_logging()

    from search.config import search_config_from_dict
    from search.launch import launch, parse_gpus
    from search.leaderboard import best_trial, status
    from search.study import create_study, load_study

    work = common.work_dir(args, "search")
    raw, corpus, source = common.report_study_raw(args, work, f"bench-search-{int(time.time())}")
    raw["pruner"]["max_resource"] = None
    raw.update(n_trials=args.n_trials, timeout_s=args.timeout_s)
    cfg = search_config_from_dict(raw)
    server, where = common.server_url(args.storage)
    dbs = common.ScratchDatabases(server, ["study"])
    url = dbs.url("study")
    report = common.Report("search_study", args, {
        "search_config": source, "corpus": corpus, "storage": where, "n_trials": args.n_trials,
        "truncation": raw["truncation"], "timeout_s": args.timeout_s,
        "pruner": raw["pruner"], "sampler": raw["sampler"],
    })
    try:
        create_study(cfg, url)
        gpus = None if args.cpu_workers else parse_gpus(args.gpus)
        started = time.perf_counter()
        rc = launch(cfg.name, gpus=gpus, cpu_workers=args.cpu_workers, storage_url=url,
                    progress_every_s=30.0)
        report["study_wall_s"] = round(time.perf_counter() - started, 1)
        report["launch_exit_status"] = rc
        study, cfg = load_study(cfg.name, url)
        summary = status(study, cfg, top=args.n_trials + 10)
        best = best_trial(study)
        report["summary"] = {k: v for k, v in summary.items() if k != "top"}
        report["trials"] = [_row(r, study) for r in summary["top"]]
        report["best"] = None if best is None else {
            "trial": best.number, "bleu4": best.value, "params": best.params,
            "n_params": best.user_attrs.get("n_params"),
            "tokens_per_s": best.user_attrs.get("tokens_per_s"),
        }
        report.finish("ok" if rc == 0 else "failed")
    finally:
        dbs.drop()
    return 0 if rc == 0 else 1


def _row(row: dict[str, Any], study: Any) -> dict[str, Any]:
    attrs = study.trials[row["trial"]].user_attrs
    keep = ("n_params", "tokens_per_s", "wall_seconds", "gpu_seconds", "val_loss", "curve")
    return {**{k: v for k, v in row.items() if k != "params"}, "params": row["params"],
            **{k: attrs.get(k) for k in keep}}


if __name__ == "__main__":
    raise SystemExit(main())
