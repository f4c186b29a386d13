"""``amt-search quickstart``: the whole service end to end on the defaults.

create-study (configs/quickstart.yaml unless --config) → launch (one worker per GPU, else
K CPU workers) → leaderboard, best trial, report figures, and the commands that promote the
best trial and open the dashboard. Storage: --storage, $AMT_STORAGE_URL, else the embedded
PostgreSQL. Nothing here that the individual commands cannot do: it only chains them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run_quickstart"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "quickstart",
        help="create a small study, run it on every GPU (or 2 CPU workers), print the results",
        description="The service end to end on its defaults: create a study from "
        "configs/quickstart.yaml (a tiny decoder on the Bible English->French, Hyperband "
        "pruning), launch one worker per GPU or --cpu-workers on the CPU, then print the "
        "leaderboard and the best trial, write the report's figures, and print the commands "
        "that promote the best trial and open the dashboard.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="search YAML")
    p.add_argument("--storage", help="storage URL (default: $AMT_STORAGE_URL, else embedded)")
    p.add_argument(
        "--study-name", help="study name (default: the config's name and the current time)"
    )
    p.add_argument(
        "--cpu-workers",
        type=int,
        default=2,
        metavar="K",
        help="CPU workers when no GPU is visible (default 2)",
    )
    p.add_argument("--cpu", action="store_true", help="use CPU workers even when GPUs exist")
    p.add_argument(
        "--report-dir", metavar="DIR", help="where the figures go (default reports/<study>)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return run_quickstart(
        args.config, args.storage, args.study_name, args.cpu_workers, args.cpu, args.report_dir
    )


def run_quickstart(
    config: str,
    storage_url: str | None = None,
    study_name: str | None = None,
    cpu_workers: int = 2,
    force_cpu: bool = False,
    report_dir: str | None = None,
) -> int:
    from search.commands import format_best
    from search.config import load_search_config
    from search.errors import SearchError
    from search.launch import detect_gpus, launch
    from search.leaderboard import best_trial, format_rows, trial_rows
    from search.report import write_report
    from search.study import create_study, load_study
    from storage import mask_url, resolve_url

    if cpu_workers < 1:
        raise SearchError(f"--cpu-workers must be >= 1, got {cpu_workers}")
    if report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise SearchError(f"--report-dir {report_dir}: a file, not a directory — give a "
                          "directory for the report")
    started = time.monotonic()
    cfg = load_search_config(config)
    name = study_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    url = resolve_url(storage_url)
    gpus = [] if force_cpu else detect_gpus()
    where = f"{len(gpus)} GPU worker(s)" if gpus else f"{cpu_workers} CPU worker(s)"
    print(f"[quickstart] study {name} on {mask_url(url)} with {where}", flush=True)
    create_study(cfg, url, name)
    status = launch(
        name, gpus=gpus or None, cpu_workers=0 if gpus else cpu_workers, storage_url=url
    )
    study, stored = load_study(name, url)
    print("\n== leaderboard ==")
    print(format_rows(trial_rows(study, stored), "table"))
    print("\n== best trial ==")
    try:
        print(format_best(study, stored, "table"))
    except SearchError as e:
        print(f"no best trial: {e}")
    out = Path(report_dir or Path("reports") / name)
    report = write_report(name, out, url)
    minutes = (time.monotonic() - started) / 60
    # masked: the password stays in $AMT_STORAGE_URL or the user's own command line
    storage_arg = f" --storage '{mask_url(url)}'" if storage_url else ""
    best = best_trial(study)
    trial = str(best.number) if best is not None else "<N>"
    if status == 130:
        print(f"\n[quickstart] stopped after {minutes:.1f} min; the running trials saved and "
              f"wait. Continue with: amt-search launch --study {name} "
              + (f"--gpus {','.join(map(str, gpus))}" if gpus else f"--cpu-workers {cpu_workers}")
              + storage_arg)
        return status
    print(
        f"\n[quickstart] done in {minutes:.1f} min; figures and summary: {report}\n"
        f"next:\n"
        f"  amt-search promote --study {name} --trial {trial} --run{storage_arg}"
        "   # train the best trial's config in full\n"
        f"  amt-search dashboard{storage_arg}"
        "   # optuna-dashboard on http://127.0.0.1:8080\n"
        f"  amt-search report --study {name} --out {out}{storage_arg}"
    )
    return status
