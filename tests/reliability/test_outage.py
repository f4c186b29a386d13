"""PostgreSQL stopped mid-study for 0, 20 and 60 s (the embedded server: ``pg_ctl stop -m fast``,
then started again) while two workers train; frozen (SIGSTOP, as a hung host or a cut network
looks) for longer than the grace period.

The workers must wait and carry on: every trial completes, no trial is declared stale or
retried, every evaluation's report is in the study (none lost) and no trial is duplicated.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from optuna.trial import TrialState

from tests.reliability.conftest import GRACE_S, EmbeddedPG, ForkServer, make_study, wait_for

OUTAGES_S = (0, 20, 60)
N_TRIALS = 6  # 3 a worker: the third outage must find both mid-trial, however fast they train
EVAL_EVERY = 4
N_EVALS = 15
TRUNCATION = {"max_steps": EVAL_EVERY * N_EVALS, "eval_every": EVAL_EVERY, "eval_subset": 8,
              "warmup": 0.1}


def test_postgres_down_for_0_20_and_60_s_mid_study(
    forkserver: ForkServer, corpus_dir: Path, embedded_pg: EmbeddedPG, tmp_path: Path,
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    study = make_study(
        tmp_path, corpus_dir, embedded_pg.url, "outage", n_trials=N_TRIALS,
        truncation=TRUNCATION,
    )
    workers = [study.spawn(forkserver, i) for i in range(2)]

    def reports() -> int:
        return sum(len(t.intermediate_values) for t in study.study().get_trials(deepcopy=False))

    def running() -> int:
        return len(study.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    durations = []
    for down_s in OUTAGES_S:
        seen = reports()
        wait_for(lambda: reports() >= seen + 2 and running() == 2, 120,  # noqa: B023
                 "two more reports with both workers mid-trial")
        stopped = time.monotonic()
        embedded_pg.stop()
        time.sleep(down_s)
        embedded_pg.start()
        durations.append(time.monotonic() - stopped)
    codes = [w.wait(180) for w in workers]
    seconds = time.monotonic() - started

    trials = study.study().get_trials(deepcopy=False)
    problems = [f"worker exited {rc}:\n{w.tail()}" for w, rc in zip(workers, codes, strict=True)
                if rc != 0]
    if sorted(t.number for t in trials) != list(range(N_TRIALS)):
        problems.append(f"trials {sorted(t.number for t in trials)}, wanted 0..{N_TRIALS - 1}")
    for t in trials:
        if t.state != TrialState.COMPLETE or "failed_trial" in t.system_attrs:
            problems.append(f"trial {t.number} {t.state.name}, retry of "
                            f"{t.system_attrs.get('failed_trial')}")
        metrics = (study.run_dir(t.number) / "metrics.jsonl").read_text().splitlines()
        evals = {k + 1: json.loads(line)["bleu"] for k, line in enumerate(metrics)}
        if t.intermediate_values != evals or len(evals) != N_EVALS:
            problems.append(f"trial {t.number} reported {sorted(t.intermediate_values)}, "
                            f"trained {sorted(evals)}")
    logs = "".join(w.text() for w in workers)
    if "database unavailable" not in logs:
        problems.append("no worker saw the database go away")
    print(f"outages of {[round(d, 1) for d in durations]} s; study took {seconds:.0f} s")
    for down_s, took in zip(OUTAGES_S, durations, strict=True):
        record(f"PostgreSQL down {down_s} s", 1, int(not problems), seconds,
               f"stopped, started again {took:.1f} s later, two workers mid-trial; they wait and "
               "carry on; every trial completes, none stale or retried; every eval's report "
               "stored (none lost); no duplicate trial")
    assert not problems, "\n".join(problems)


def test_sigterm_during_an_outage_leaves_at_once_and_the_trial_resumes_later(
    forkserver: ForkServer, corpus_dir: Path, embedded_pg: EmbeddedPG, tmp_path: Path,
    record: Callable[..., None],
) -> None:
    """SIGTERM to a worker while PostgreSQL is down: it does not wait out the outage (600 s by
    default) but leaves within seconds, one error line, its checkpoint on disk; once the
    database is back, the next worker fails the trial as stale and resumes it from there."""
    started = time.monotonic()
    study = make_study(
        tmp_path, corpus_dir, embedded_pg.url, "outage-term", n_trials=1,
        truncation=TRUNCATION,
    )
    worker = study.spawn(forkserver, 0)
    wait_for(lambda: worker.progress()[1] >= 2, 120, "two evals of the first trial")
    embedded_pg.stop()
    try:
        time.sleep(2)
        worker.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = worker.wait(120)
        left_s = time.monotonic() - signalled
    finally:
        embedded_pg.start()
    problems = []
    errors = [line for line in worker.text().splitlines() if "amt-search: error:" in line]
    if code != 2 or left_s > 30:
        problems.append(f"exit {code} after {left_s:.0f} s (wanted 2 within 30 s)")
    if len(errors) != 1 or "stopped while the study database" not in errors[0]:
        problems.append(f"error lines {errors}")
    if "Traceback" in worker.text():
        problems.append("a traceback in the worker's log")
    again = study.spawn(forkserver, 1)
    if again.wait(240) != 0:
        problems.append(f"the next worker failed:\n{again.tail()}")
    trials = study.study().get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(done) != 1 or done[0].user_attrs.get("resumed_from") != 0:
        states = [(t.number, t.state.name, t.user_attrs.get("resumed_from")) for t in trials]
        problems.append(f"trials {states}")
    record("SIGTERM during a PostgreSQL outage", 1, int(not problems),
           time.monotonic() - started,
           f"the worker leaves {left_s:.1f} s after SIGTERM with one error line (no traceback), "
           "not after the 600 s retry window; with the database back the next worker fails the "
           "trial as stale and completes it from its checkpoint")
    assert not problems, "\n".join(problems)


def test_postgres_frozen_past_the_grace_period_fails_no_trial(
    forkserver: ForkServer, corpus_dir: Path, embedded_pg: EmbeddedPG, tmp_path: Path,
    record: Callable[..., None],
) -> None:
    """Every heartbeat stops at once and comes back at once: the first worker to look after
    the freeze must not fail the other's trial as stale (no trial retried), and both finish."""
    from storage import embedded

    started = time.monotonic()
    study = make_study(
        tmp_path, corpus_dir, embedded_pg.url, "frozen", n_trials=4,
        truncation=TRUNCATION,
    )
    workers = [study.spawn(forkserver, i) for i in range(2)]

    def running() -> int:
        return len(study.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    wait_for(lambda: running() == 2, 120, "both workers mid-trial")
    time.sleep(1.0)
    server = psutil.Process(embedded_pg._call(embedded.status)["pid"])
    frozen = [server, *server.children(recursive=True)]
    for p in frozen:
        with contextlib.suppress(psutil.NoSuchProcess):  # a backend that just ended
            p.suspend()
    time.sleep(2 * GRACE_S)
    for p in frozen:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.resume()
    codes = [w.wait(180) for w in workers]
    trials = study.study().get_trials(deepcopy=False)
    problems = [f"worker exited {rc}:\n{w.tail()}" for w, rc in zip(workers, codes, strict=True)
                if rc != 0]
    retried = [t.number for t in trials if "failed_trial" in t.system_attrs]
    states = sorted(t.state.name for t in trials)
    if retried or states != ["COMPLETE"] * 4:
        problems.append(f"trials {states}, retries of {retried}")
    record("PostgreSQL frozen (SIGSTOP) past the grace period", 1, int(not problems),
           time.monotonic() - started,
           f"the server and its backends stopped {2 * GRACE_S} s (twice the grace period) "
           "with two workers mid-trial, then continued: no trial failed as stale or retried, "
           "every trial completes")
    assert not problems, "\n".join(problems)
