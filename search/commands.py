"""The study commands of ``amt-search``: create-study, worker, launch, status, trials, best,
promote. Thin parsers; the work is in search.study, .worker, .launch, .leaderboard, .promote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

__all__ = ["register"]

_STORAGE_HELP = "storage URL (default: $AMT_STORAGE_URL, else the embedded PostgreSQL)"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "create-study",
        help="validate a search config, create the study, enqueue its warm starts",
        description="Validate a search YAML (every searched key against TrainConfig), create "
        "the schema and the study, store the whole config with it (workers need only the "
        "study name and the storage) and enqueue the config's warm starts (the report's three "
        "trials) as trials 0, 1, 2.",
    )
    p.add_argument("--config", required=True, help="search YAML, e.g. configs/search.yaml")
    p.add_argument("--storage", help=_STORAGE_HELP)
    p.add_argument("--study-name", help="study name (default: the config's name)")
    p.add_argument(
        "--skip-if-exists",
        action="store_true",
        help="an existing study of that name is left as it is (exit 0) instead of an error",
    )
    p.set_defaults(func=_create_study)

    p = sub.add_parser(
        "worker",
        help="run trials of a study on one GPU (or the CPU) until the study is done",
        description="Run trials one after another in this process (data and CUDA context are "
        "reused) until the study has n_trials finished trials or its timeout passed. Stale "
        "trials of dead workers are retried from their last checkpoint. SIGTERM: the running "
        "trial saves, is re-enqueued, and the worker exits 0.",
    )
    p.add_argument("--study", required=True, help="study name")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--gpu", type=int, metavar="I", help="pin to GPU I (CUDA_VISIBLE_DEVICES=I)"
    )
    where.add_argument("--cpu", action="store_true", help="train on the CPU")
    p.add_argument("--storage", help=_STORAGE_HELP)
    p.add_argument("--n-trials", type=int, metavar="K", help="leave after K trials of this worker")
    p.add_argument(
        "--worker-index",
        type=int,
        metavar="K",
        help="offsets the sampler seed (default: $AMT_WORKER_INDEX, else the GPU index, else 0)",
    )
    p.set_defaults(func=_worker)

    p = sub.add_parser(
        "launch",
        help="start one worker per GPU (or K CPU workers) and watch them",
        description="Start one 'amt-search worker' subprocess per GPU (or K CPU workers), print "
        "a progress line from the storage while they run, and exit when they are all done. "
        "Ctrl-C or SIGTERM stops them cleanly (each saves and re-enqueues its trial); a second "
        "Ctrl-C kills them.",
    )
    p.add_argument("--study", required=True, help="study name")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="'all' or GPU indices such as 0,1")
    where.add_argument("--cpu-workers", type=int, metavar="K", help="K workers on the CPU")
    p.add_argument("--storage", help=_STORAGE_HELP)
    p.add_argument(
        "--progress-every", type=_seconds, default=10.0, metavar="S",
        help="seconds between lines (default 10)"
    )
    p.set_defaults(func=_launch)

    for name, help_text in (
        ("status", "trial counts, budget, best trial and the top five"),
        ("trials", "every trial as Report 03's table: trial, layers, hidden, LR, BLEU-4 ..."),
        ("best", "the best complete trial, its parameters and how to promote it"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper()
            + help_text[1:]
            + ". Pruned trials show their last BLEU-4 in parentheses.",
        )
        p.add_argument("--study", help="study name (default: the storage's only study)")
        p.add_argument("--storage", help=_STORAGE_HELP)
        p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                       help="table (default), csv or json (every parameter and attribute)")
        if name == "trials":
            p.add_argument(
                "--sort",
                choices=("bleu", "number"),
                default="bleu",
                help="bleu: complete trials best first (default); number: trial order",
            )
        p.set_defaults(func=_report)

    p = sub.add_parser(
        "promote",
        help="write trial N's full-run training config (and train it with --run)",
        description="Write the full-run TrainConfig YAML for trial N (the study's own trial "
        "numbers): the study's recipe with the trial's parameters, no truncation, and meta "
        "{study, trial, storage}. With --run, train it: amt-train on one GPU or the CPU, "
        "torchrun --nproc-per-node N on N GPUs.",
    )
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--trial", required=True, type=int, metavar="N", help="trial number")
    p.add_argument("--out", metavar="FILE", help="config path (default ./<study>-trial-<N>.yaml)")
    p.add_argument("--run", action="store_true", help="train the written config now")
    p.add_argument(
        "--gpus",
        default="all",
        help="with --run: 'all' (default; the CPU when there is no GPU), 'cpu', or indices 0,1",
    )
    p.add_argument("--storage", help=_STORAGE_HELP)
    p.set_defaults(func=_promote)

    p = sub.add_parser(
        "delete-study",
        help="delete a study and its trials' run directories (promoted full runs stay)",
        description="Delete the study (every trial and its stored config) from the storage and "
        "its trials' checkpoints under $AMT_HOME/runs/<study>/trial-*. Promoted full runs "
        "(full-trial-*) are trained models and are kept. Asks first on a terminal; elsewhere "
        "give --yes. Refused while trials run (stop the workers first) unless --force.",
    )
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help=_STORAGE_HELP)
    p.add_argument("--keep-runs", action="store_true",
                   help="delete the study only; leave its run directories on disk")
    p.add_argument("--force", action="store_true",
                   help="delete it even with RUNNING trials (their workers then stop)")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    p.set_defaults(func=_delete_study)


def _create_study(args: argparse.Namespace) -> int:
    from search.config import load_search_config
    from search.study import create_study

    cfg = load_search_config(args.config)
    study = create_study(cfg, args.storage, args.study_name, args.skip_if_exists)
    trials = study.get_trials(deepcopy=False)
    waiting = sum(t.state.name == "WAITING" for t in trials)
    print(f"study {study.study_name}: {len(trials)} trials, {waiting} queued to run")
    import torch  # (create-study loaded it for the corpus check)

    storage = " --storage URL" if args.storage else ""  # (no password echoed)
    where = "--gpus all" if torch.cuda.is_available() else "--cpu-workers 2"
    print(f"next: amt-search launch --study {study.study_name} {where}{storage}; watch it "
          f"with amt-search status --study {study.study_name}{storage} or amt-search "
          "dashboard")
    return 0


def _delete_study(args: argparse.Namespace) -> int:
    import sys

    from search.errors import SearchError
    from search.study import delete_study

    def plan(d: Any) -> str:
        runs = (f"{len(d.run_dirs)} trial run director{'y' if len(d.run_dirs) == 1 else 'ies'}"
                f" ({d.run_bytes / 1e6:.1f} MB)" if d.run_dirs else "no trial run directory")
        kept = f"; these stay: {', '.join(d.kept)}" if d.kept else ""
        return f"study {d.study} ({d.trials} trials) and {runs}{kept}"

    if not args.yes:
        d = delete_study(args.study, args.storage, keep_runs=args.keep_runs, force=args.force,
                         dry_run=True)
        if not sys.stdin.isatty():
            raise SearchError(f"this would delete {plan(d)}: pass --yes to do it")
        try:
            answer = input(f"delete {plan(d)}? [y/N] ")
        except EOFError:  # Ctrl-D
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    d = delete_study(args.study, args.storage, keep_runs=args.keep_runs, force=args.force)
    print(f"deleted {plan(d)}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    # before anything can initialise CUDA
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if args.cpu else str(args.gpu)
    from search.worker import run_worker

    if args.n_trials is not None and args.n_trials < 1:
        from search.errors import SearchError

        raise SearchError(f"--n-trials must be >= 1, got {args.n_trials}")
    index = args.worker_index
    if index is None and os.environ.get("AMT_WORKER_INDEX", "").isdigit():
        index = int(os.environ["AMT_WORKER_INDEX"])
    return run_worker(
        args.study,
        gpu=None if args.cpu else args.gpu,
        storage_url=args.storage,
        n_trials=args.n_trials,
        worker_index=index,
    )


def _launch(args: argparse.Namespace) -> int:
    from search.errors import SearchError
    from search.launch import launch, parse_gpus

    if args.cpu_workers is not None and args.cpu_workers < 1:
        raise SearchError(f"--cpu-workers must be >= 1, got {args.cpu_workers}")
    return launch(
        args.study,
        gpus=parse_gpus(args.gpus) if args.gpus else None,
        cpu_workers=args.cpu_workers or 0,
        storage_url=args.storage,
        progress_every_s=args.progress_every,
    )


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _report(args: argparse.Namespace) -> int:
    from search import leaderboard
    from search.study import load_study

    study, cfg = load_study(args.study, args.storage)  # None: the storage's only study
    if args.command == "trials":
        print(leaderboard.format_rows(leaderboard.trial_rows(study, cfg, args.sort), args.format))
    elif args.command == "status":
        print(_format_status(leaderboard.status(study, cfg), args.format))
    else:
        print(format_best(study, cfg, args.format))
    return 0


def _format_status(s: dict[str, Any], fmt: str) -> str:
    from search import leaderboard

    if fmt == "json":
        return json.dumps(s, indent=2)
    if fmt == "csv":
        return leaderboard.format_rows(s["top"], "csv")
    budget = f"/{s['n_trials']}" if s["n_trials"] else ""
    best = (
        f"trial {s['best_trial']}, BLEU-4 {s['best_bleu4']:.2f}"
        if s["best_trial"] is not None
        else "none yet"
    )
    compute = (
        f"GPU-seconds {s['gpu_seconds']:.0f}"
        if s["gpu_seconds"]
        else f"CPU-seconds {s['cpu_seconds'] or 0:.0f}"
    )
    lines = [
        f"study {s['study']}: {s['finished']}{budget} finished ({s['complete']} complete, "
        f"{s['pruned']} pruned, {s['failed']} failed), {s['running']} running, "
        f"{s['waiting']} waiting",
        f"best: {best}; {compute}",
        "",
        leaderboard.format_rows(s["top"], "table"),
    ]
    return "\n".join(lines)


def format_best(study: Any, cfg: Any, fmt: str) -> str:
    from search import leaderboard
    from search.errors import SearchError

    best = leaderboard.best_trial(study)
    if best is None:
        raise SearchError(f"study '{study.study_name}' has no complete trial yet")
    row = leaderboard.trial_row(cfg, best)
    if fmt == "json":
        return json.dumps({**row, "user_attrs": best.user_attrs}, indent=2)
    if fmt == "csv":
        return leaderboard.format_rows([row], "csv")
    attrs = best.user_attrs
    lines = [
        f"best trial: {best.number} (BLEU-4 {best.value:.2f})",
        leaderboard.format_rows([row], "table"),
        "parameters:",
        *(f"  {k}: {v}" for k, v in best.params.items()),
        f"val loss {attrs.get('val_loss', float('nan')):.4f} at step {attrs.get('steps', '?')}; "
        f"{attrs.get('n_params', 0) / 1e6:.1f} M non-embedding parameters",
        f"checkpoint: {attrs.get('checkpoint')} (sha256 {attrs.get('checkpoint_sha256')})",
        f"promote: amt-search promote --study {study.study_name} --trial {best.number} --run",
    ]
    return "\n".join(lines)


def _promote(args: argparse.Namespace) -> int:
    from search.launch import detect_gpus, parse_gpus
    from search.promote import promote, run_training

    gpus: list[int] = []
    if args.run and args.gpus == "all":
        gpus = detect_gpus()
    elif args.run and args.gpus != "cpu":
        gpus = parse_gpus(args.gpus)  # before writing anything
    path = promote(args.study, args.trial, args.storage, args.out)
    print(f"wrote {path}")
    if not args.run:
        print(f"train it: amt-train --config {path}")
        return 0
    return run_training(path, gpus)
