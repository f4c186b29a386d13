"""SIGSTOP: a worker frozen mid-trial for 20 s (longer than the storage's 10 s lock timeout
and the 6 s grace period), and with it a process frozen while it holds the study's start
lock, the worst moment for a worker to freeze.

The other workers must keep creating and finishing trials while both are frozen; the frozen
worker's trial is failed and retried by another worker; once continued, the frozen worker
drops the trial it lost and goes on; the study ends with exactly ``n_trials`` finished.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
from optuna.trial import TrialState

from search.study import count_trials
from tests.reliability.conftest import ForkServer, make_study, wait_for

STOP_S = 20  # > the 10 s start-lock hold limit with room for a loaded CI machine
N_TRIALS = 10
N_WORKERS = 3


def test_frozen_worker_and_frozen_lock_holder_do_not_stop_the_others(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    study = make_study(tmp_path, corpus_dir, new_database(), "sigstop", n_trials=N_TRIALS)
    workers = [study.spawn(forkserver, i) for i in range(N_WORKERS)]
    frozen = wait_for(lambda: next((w for w in workers if w.progress()[1] >= 1), None), 120,
                      "a worker mid-trial")
    lost_trial, _ = frozen.progress()
    frozen.signal(signal.SIGSTOP)
    holder = forkserver.spawn([study.url, study.name], study.env(), study.logs / "lock.log",
                              target="tests.reliability.helpers:hold_start_lock")
    wait_for(lambda: psutil.Process(holder.pid).status() == psutil.STATUS_STOPPED, 60,
             f"the start lock's holder to freeze:\n{holder.tail()}")
    stop_from = datetime.now()
    time.sleep(STOP_S)
    stop_to = datetime.now()
    frozen.signal(signal.SIGCONT)
    holder.signal(signal.SIGKILL)  # its session was ended by the server long ago
    codes = [w.wait(180) for w in workers]
    seconds = time.monotonic() - started

    trials = study.study().get_trials(deepcopy=False)
    created = [t.number for t in trials
               if t.datetime_start and stop_from < t.datetime_start < stop_to]
    finished = [t.number for t in trials if t.state == TrialState.COMPLETE
                and t.datetime_complete and stop_from < t.datetime_complete < stop_to]
    by_number = {t.number: t for t in trials}
    retry = next((t for t in trials if t.system_attrs.get("failed_trial") == lost_trial), None)
    counts = count_trials(trials)
    problems = [f"worker {i} exited {rc}:\n{w.tail()}"
                for i, (w, rc) in enumerate(zip(workers, codes, strict=True)) if rc != 0]
    if not created or not finished:
        problems.append(f"while frozen the others created {created} and finished {finished}")
    assert lost_trial is not None
    if by_number[lost_trial].state != TrialState.FAIL:
        problems.append(f"the frozen trial {lost_trial} is {by_number[lost_trial].state.name}")
    if f"trial {lost_trial}: failed as stale while this worker could not beat" not in (
            frozen.text()):
        problems.append(f"the continued worker did not drop its trial:\n{frozen.tail()}")
    if retry is None or retry.state != TrialState.COMPLETE:
        problems.append(f"the frozen trial's retry: {retry and retry.state.name}")
    if (counts.finished, counts.running, counts.waiting) != (N_TRIALS, 0, 0) or len(trials) != (
            N_TRIALS + 1):
        problems.append(f"{len(trials)} trials: {counts}")
    offsets = sorted(round((by_number[n].datetime_start - stop_from).total_seconds(), 1)
                     for n in created)
    print(f"while frozen for {STOP_S} s: trials created at {offsets} s, {finished} completed")
    record(f"SIGSTOP a worker (and the start lock's holder) {STOP_S} s", 1, int(not problems),
           seconds,
           f"while both are frozen the others create {len(created)} trials (the first "
           f"{min(offsets, default=0)} s in: the start lock's 10 s hold limit) and complete "
           f"{len(finished)}; the frozen trial is retried elsewhere; the continued worker drops "
           "it and goes on; n_trials finished")
    assert not problems, "\n".join(problems)
