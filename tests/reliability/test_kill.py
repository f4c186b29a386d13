"""kill -9, over and over: a supervisor keeps three workers alive while a killer SIGKILLs the
worker of a random running trial at a random eval, twenty times and more in one study; and
one trial's process dies before its first heartbeat.

Every killed trial must be failed after the grace period, retried exactly once by a live
worker, and its retry must continue from the killed trial's last checkpoint (not from step
0); the study must end with exactly ``n_trials`` finished, none RUNNING or WAITING.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState

from search.study import count_trials
from tests.reliability.conftest import (
    GRACE_S,
    HEARTBEAT_S,
    ForkServer,
    TinyStudy,
    Worker,
    make_study,
    resumed_steps,
    wait_for,
)

N_TRIALS = 30  # 29 first attempts for the 20 kills: slack for trials that end unseen on busy cores
N_WORKERS = 3
KILLS = 20
EVAL_EVERY = 4
N_EVALS = 10
# Every worker checks for stale trials every heartbeat interval: a killed trial, whose last
# heartbeat was at most one interval before the kill, is FAIL one interval after its grace
# period at the latest (+ 2 s for the shared CI cores).
FAIL_WITHIN_S = GRACE_S + HEARTBEAT_S + 2


@dataclass
class Kill:
    trial: int
    at: datetime


class Supervisor:
    """Keeps ``n`` workers running: a worker that was killed is replaced by a new one."""

    def __init__(self, server: ForkServer, study: TinyStudy, n: int) -> None:
        self.server, self.study = server, study
        self.workers = [study.spawn(server, i) for i in range(n)]
        self.spawned = n
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for i, w in enumerate(self.workers):
                if w.killed and w.poll() is not None:
                    self.workers[i] = self.study.spawn(self.server, self.spawned)
                    self.spawned += 1

    def live(self) -> list[Worker]:
        return [w for w in self.workers if not w.killed and w.poll() is None]


def test_sigkill_twenty_times_mid_trial_and_once_before_the_first_heartbeat(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    study = make_study(
        tmp_path, corpus_dir, new_database(), "kill", n_trials=N_TRIALS,
        truncation={"max_steps": EVAL_EVERY * N_EVALS, "eval_every": EVAL_EVERY,
                    "eval_subset": 8, "warmup": 0.1},
    )
    # a process that creates a trial and dies before any heartbeat
    asker = forkserver.spawn([study.url, study.name], study.env(), study.logs / "ask.log",
                             target="tests.reliability.helpers:ask")
    wait_for(lambda: "asked trial" in asker.text(), 60, "the trial made without a heartbeat")
    asker.signal(signal.SIGKILL)
    asker.wait(10)
    silent = study.study().trials[0]
    assert silent.state == TrialState.RUNNING

    supervisor = Supervisor(forkserver, study, N_WORKERS)
    rng = random.Random(0)
    kill_at: dict[int, int] = {}  # trial -> the eval count at which its worker is killed
    kills: list[Kill] = []
    try:
        deadline = time.monotonic() + 240
        while len(kills) < KILLS and time.monotonic() < deadline:
            trials = {t.number: t for t in study.study().get_trials(deepcopy=False)}
            for w in supervisor.live():
                number, evals = w.progress()  # from its log: ahead of any snapshot
                t = trials.get(number) if number is not None else None
                if t is None or t.system_attrs.get("retry_history"):
                    continue  # only first attempts: a retry killed again fails for good
                if evals >= kill_at.setdefault(t.number, rng.randint(1, N_EVALS - 2)):
                    w.killed = True
                    w.signal(signal.SIGKILL)
                    kills.append(Kill(t.number, datetime.now()))
                    break
            time.sleep(0.1)
        assert len(kills) >= KILLS, f"only {len(kills)} kills before the study ended"
        wait_for(lambda: not any(w.killed for w in supervisor.workers), 30, "the last restart")
    finally:
        supervisor.stop.set()
        supervisor.thread.join()
    for w in supervisor.workers:  # no more kills: the study runs to its end
        assert w.wait(180) == 0, w.tail()
    seconds = time.monotonic() - started

    trials = {t.number: t for t in study.study().get_trials(deepcopy=False)}
    logs = [p.read_text() for p in sorted(study.logs.glob("worker-*.log"))]
    resumed = resumed_steps(logs)
    retries = {t.system_attrs["failed_trial"]: t for t in trials.values()
               if "failed_trial" in t.system_attrs}
    problems = {k.trial: _check_killed(trials[k.trial], k.at, retries, resumed, resumes=True)
                for k in kills}
    problems[silent.number] = _check_killed(trials[silent.number], silent.datetime_start,
                                            retries, resumed, resumes=False)
    counts = count_trials(list(trials.values()))
    latencies = sorted(round((trials[k.trial].datetime_complete - k.at).total_seconds(), 1)
                       for k in kills if trials[k.trial].datetime_complete is not None)
    print(f"{len(kills)} kills; kill -> FAIL seconds: {latencies}; resumed at steps "
          f"{sorted(resumed.values())}")
    record("kill -9 mid-trial", len(kills), sum(not problems[k.trial] for k in kills), seconds,
           f"FAIL {min(latencies, default=0)}-{max(latencies, default=0)} s after the kill "
           f"(bound {FAIL_WITHIN_S} s, grace {GRACE_S} s), retried once by a live worker, resumed "
           f"from its last checkpoint (steps {min(resumed.values(), default=0)}-"
           f"{max(resumed.values(), default=0)}), completed; exactly n_trials finished")
    record("kill -9 before the first heartbeat", 1, int(not problems[silent.number]), seconds,
           "a RUNNING trial that never beat is failed after the grace period and retried")

    assert not [p for found in problems.values() for p in found], problems
    assert (counts.finished, counts.complete, counts.running, counts.waiting) == (
        N_TRIALS, N_TRIALS, 0, 0)
    # one retry per kill and nothing else: no duplicate trial
    assert len(trials) == N_TRIALS + len(kills) + 1
    assert sorted(trials) == list(range(len(trials)))
    assert len(retries) == len(kills) + 1


def _check_killed(t: FrozenTrial, killed_at: datetime | None, retries: dict[int, FrozenTrial],
                  resumed: dict[int, int], resumes: bool) -> list[str]:
    """What is wrong with how killed trial ``t`` was handled (nothing: [])."""
    if t.state != TrialState.FAIL:
        return [f"{t.state.name}, not FAIL"]
    assert t.datetime_complete is not None and killed_at is not None
    out = []
    latency = (t.datetime_complete - killed_at).total_seconds()
    if latency > FAIL_WITHIN_S:
        out.append(f"FAIL {latency:.1f} s after the kill")
    retry = retries.get(t.number)
    if retry is None:
        return [*out, "no retry"]
    if retry.state != TrialState.COMPLETE:
        out.append(f"its retry {retry.number} is {retry.state.name}")
    if retry.system_attrs.get("retry_history") != [t.number]:
        out.append(f"retry history {retry.system_attrs.get('retry_history')}")
    if resumes:
        if retry.user_attrs.get("resumed_from") != t.number:
            out.append(f"retry resumed_from {retry.user_attrs.get('resumed_from')}")
        if resumed.get(retry.number, 0) <= 0:
            out.append(f"retry {retry.number} started at step 0")
        if set(retry.intermediate_values) != set(range(1, N_EVALS + 1)):
            out.append(f"retry {retry.number} has evals {sorted(retry.intermediate_values)}")
    return out
