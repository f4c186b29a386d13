"""Processes that the storage tests start, kill and stop: ``python -m tests.storage.worker``.

optimize URL STUDY N   run N trials (creating the study if needed), each reporting --steps values
sleep URL STUDY        start one trial, print "started <number>", sleep until killed
hold-lock URL STUDY    lock the study row in an open transaction, print "locked", SIGSTOP itself
join                   ensure_server(); print "joined <postmaster pid>"; then per stdin line:
                       "query" prints "ok <pid>" or "error <message>", "exit" leaves
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import optuna
from sqlalchemy import text

from storage import open_storage


def _storage(args: argparse.Namespace) -> optuna.storages.RDBStorage:
    return open_storage(
        args.url,
        heartbeat_interval=args.heartbeat,
        grace_period=args.grace,
        lock_timeout_s=args.lock_timeout,
        idle_in_transaction_timeout_s=args.idle_timeout,
        retry_for_s=args.retry_for,
    )


def optimize(args: argparse.Namespace) -> None:
    study = optuna.create_study(
        storage=_storage(args),
        study_name=args.study,
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=os.getpid()),
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(args.steps):
            trial.report(x + step, step)
            time.sleep(args.step_sleep)
        return x

    study.optimize(objective, n_trials=args.n_trials)


def sleep(args: argparse.Namespace) -> None:
    study = optuna.load_study(storage=_storage(args), study_name=args.study)

    def objective(trial: optuna.Trial) -> float:
        print(f"started {trial.number}", flush=True)
        time.sleep(3600)
        return 0.0

    study.optimize(objective, n_trials=1)


def hold_lock(args: argparse.Namespace) -> None:
    storage = _storage(args)
    study_id = storage.get_study_id_from_name(args.study)
    conn = storage.engine.connect()
    conn.execute(text("SELECT * FROM studies WHERE study_id = :id FOR UPDATE"), {"id": study_id})
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    conn.close()


def join(args: argparse.Namespace) -> None:
    import psycopg2

    from storage import embedded, resolve_url

    url = resolve_url()
    print(f"joined {embedded.status()['pid']}", flush=True)
    dsn = url.replace("+psycopg2", "")
    for line in sys.stdin:
        if line.strip() == "exit":
            return
        try:
            with psycopg2.connect(dsn, connect_timeout=3) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_postmaster_start_time()")
                print(f"ok {cur.fetchone()[0].isoformat()}", flush=True)
            conn.close()
        except psycopg2.Error as e:
            print(f"error {str(e).strip().splitlines()[0]}", flush=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["optimize", "sleep", "hold-lock", "join"])
    parser.add_argument("url", nargs="?")
    parser.add_argument("study", nargs="?")
    parser.add_argument("n_trials", nargs="?", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--heartbeat", type=int, default=1)
    parser.add_argument("--grace", type=int, default=10)
    parser.add_argument("--lock-timeout", type=float, default=10.0)
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--retry-for", type=float, default=120.0)
    args = parser.parse_args()
    {"optimize": optimize, "sleep": sleep, "hold-lock": hold_lock, "join": join}[args.command](
        args
    )


if __name__ == "__main__":
    main()
