"""Processes the fault-injection tests start through the fork server (``target=
"tests.reliability.helpers:NAME"``), each called with its argv.

ask URL STUDY              create a trial as a worker does (``study.ask``), print
                           "asked trial N", then sleep until killed: no heartbeat ever
hold-start-lock URL STUDY  take the study's start lock as a worker does, print "locked",
                           then stop itself (SIGSTOP) while holding it
"""

from __future__ import annotations

import os
import signal
import time

import optuna

from search.study import open_worker_storage
from search.worker import StartLock


def ask(argv: list[str]) -> int:
    url, name = argv
    study = optuna.load_study(study_name=name, storage=open_worker_storage(name, url))
    print(f"asked trial {study.ask().number}", flush=True)
    time.sleep(3600)
    return 0


def hold_start_lock(argv: list[str]) -> int:
    url, name = argv
    lock = StartLock(open_worker_storage(name, url), name)
    lock.acquire()
    assert lock.conn is not None, "the start lock was busy"
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    lock.release()
    return 0
