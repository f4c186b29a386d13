"""SIGTERM to a worker mid-trial: it saves a checkpoint at the next optimiser step, marks the
trial for retry (FAIL "stopped" + a WAITING retry) and exits 0; the next worker resumes the
retry from exactly that checkpoint."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from optuna.trial import TrialState

from storage.checkpoints import latest_checkpoint, verify
from tests.reliability.conftest import ForkServer, make_study, resumed_steps, wait_for


def test_sigterm_saves_marks_for_retry_and_exits_0(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    record: Callable[..., None],
) -> None:
    started = time.monotonic()
    study = make_study(
        tmp_path, corpus_dir, new_database(), "sigterm", n_trials=1,
        truncation={"max_steps": 120, "eval_every": 8, "eval_subset": 8, "warmup": 0.1},
    )
    worker = study.spawn(forkserver, 0)
    wait_for(lambda: worker.progress()[1] >= 2, 120, "two evals of trial 0")
    worker.signal(signal.SIGTERM)
    rc = worker.wait(60)

    trials = study.study().get_trials(deepcopy=False)
    stopped_at = re.findall(r"trial 0 stopped at step (\d+)", worker.text())
    checkpoint = latest_checkpoint(study.run_dir(0))
    problems = []
    if rc != 0:
        problems.append(f"the worker exited {rc}:\n{worker.tail()}")
    if trials[0].state != TrialState.FAIL or trials[0].user_attrs.get("fail_reason") != "stopped":
        problems.append(f"trial 0: {trials[0].state.name} {trials[0].user_attrs}")
    retry = trials[-1]
    if len(trials) != 2 or retry.state != TrialState.WAITING or retry.system_attrs.get(
            "failed_trial") != 0:
        problems.append(f"no retry queued: {[(t.number, t.state.name) for t in trials]}")
    saved = int(checkpoint.stem.split("_")[1]) if checkpoint else 0
    if not stopped_at or saved != int(stopped_at[0]) or saved < 16:
        problems.append(f"saved step {saved}, stopped at {stopped_at} (after 2 evals: >= 16)")
    if not all(c.ok for c in verify(study.run_dir(0))):
        problems.append(f"checkpoints do not verify: {verify(study.run_dir(0))}")

    follower = study.spawn(forkserver, 1)  # the retry resumes from the saved checkpoint
    rc = follower.wait(120)
    trials = study.study().get_trials(deepcopy=False)
    if rc != 0 or trials[-1].state != TrialState.COMPLETE:
        problems.append(f"the retry did not complete (exit {rc}):\n{follower.tail()}")
    if resumed_steps([follower.text()]).get(retry.number) != saved:
        problems.append(f"the retry resumed at {resumed_steps([follower.text()])}, saved {saved}")
    record("SIGTERM a worker", 1, int(not problems), time.monotonic() - started,
           "checkpoint at the step it stopped (verifies), trial FAIL 'stopped' + a queued "
           "retry, exit 0; the retry resumes from that step and completes")
    assert not problems, "\n".join(problems)
