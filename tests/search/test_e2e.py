"""The service end to end on CPU, real PostgreSQL, real training (tiny model, synthetic
corpus): create-study, launch --cpu-workers 2, best, promote --run; and Ctrl-C mid-study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from search.cli import main
from search.study import count_trials, load_study
from storage.paths import state_dir

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("storage_url")


def _amt_search(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "AMT_PROGRESS": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_create_launch_best_promote(
    write_search: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create-study", "--config", str(write_search())]) == 0
    launch = _amt_search(
        "launch", "--study", "tiny", "--cpu-workers", "2", "--progress-every", "2"
    )
    out, _ = launch.communicate(timeout=240)
    assert launch.returncode == 0, out[-3000:]
    assert "[launch] 8/8 finished" in out

    study, cfg = load_study("tiny")
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    assert (len(trials), counts.finished, counts.running, counts.waiting) == (8, 8, 0, 0)
    first = sorted(trials, key=lambda t: t.datetime_start)[:3]  # the warm starts ran first
    assert sorted(t.number for t in first) == [0, 1, 2]
    assert [trials[i].params for i in range(3)] == [dict(e) for e in cfg.enqueue]
    assert counts.pruned >= 1, "Hyperband pruned nothing"  # trials that BLEU ranks low
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(len(t.intermediate_values) < cfg.truncation.n_evals for t in pruned)

    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    capsys.readouterr()
    assert main(["best", "--study", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"best trial: {best.number} (BLEU-4 {best.value:.2f})")
    assert os.path.exists(best.user_attrs["checkpoint"])
    # real fits: their evaluations' seconds and the fit's timeline are on the trial
    assert 0 < best.user_attrs["eval_seconds"] < best.user_attrs["wall_seconds"]
    timing = best.user_attrs["timing"]
    assert (timing["fit_started_at"] < timing["first_step_at"] < timing["second_step_at"]
            < timing["fit_ended_at"])

    config = tmp_path / "full.yaml"
    assert main(["promote", "--study", "tiny", "--trial", str(best.number), "--out",
                 str(config), "--run", "--gpus", "cpu"]) == 0
    result = json.loads((state_dir() / "runs/tiny" / f"full-trial-{best.number}" /
                         "result.json").read_text())
    assert result["steps"] == 60 and result["stopped_by"] == "budget"  # the full recipe
    written = yaml.safe_load(config.read_text())
    assert written["meta"]["trial"] == best.number and written["meta"]["study"] == "tiny"
    assert written["model"]["d_model"] == best.params["model.d_model"]


def test_ctrl_c_saves_and_requeues_then_trials_resume(write_search: Callable[..., Path]) -> None:
    """Two long trials; Ctrl-C to the launcher once both reported an eval; both are FAIL
    'stopped' with a retry queued; a second launch resumes them from their checkpoints."""
    enqueue = [{"model.n_layers": 1, "model.d_model": 32, "optim.lr": 3e-3},
               {"model.n_layers": 1, "model.d_model": 32, "optim.lr": 5e-3}]
    truncation = {"max_steps": 600, "eval_every": 30, "eval_subset": 8, "warmup": 0.1}
    path = write_search(n_trials=2, enqueue=enqueue, truncation=truncation,
                        pruner={"type": "none"})
    assert main(["create-study", "--config", str(path)]) == 0
    study, _ = load_study("tiny")
    launch = _amt_search("launch", "--study", "tiny", "--cpu-workers", "2")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        if len(trials) == 2 and all(t.intermediate_values for t in trials):
            break
        time.sleep(0.3)
    launch.send_signal(signal.SIGINT)
    out, _ = launch.communicate(timeout=120)
    assert launch.returncode == 130, out[-3000:]  # stopped, not finished
    trials = study.get_trials(deepcopy=False)
    stopped = [t for t in trials if t.user_attrs.get("fail_reason") == "stopped"]
    assert [t.state for t in stopped] == [TrialState.FAIL] * len(stopped) and stopped
    assert {t.system_attrs["failed_trial"] for t in trials if t.state == TrialState.WAITING} \
        == {t.number for t in stopped}
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    relaunch = _amt_search("launch", "--study", "tiny", "--cpu-workers", "2")
    out, _ = relaunch.communicate(timeout=240)
    assert relaunch.returncode == 0, out[-3000:]
    trials = study.get_trials(deepcopy=False)
    assert count_trials(trials).complete == 2 and len(trials) == 2 + len(stopped)
    resumed = [t for t in trials if t.user_attrs.get("resumed_from") is not None]
    assert sorted(t.user_attrs["resumed_from"] for t in resumed) == [t.number for t in stopped]
    assert out.count("resumed from") == len(stopped)  # trainer.fit loaded the checkpoint
    for t in resumed:  # the curve covers the whole run, before and after the stop
        before = trials[t.user_attrs["resumed_from"]]
        assert set(before.intermediate_values) < set(t.intermediate_values)
        assert t.user_attrs["curve"]["step"][-1] == 600
        assert len(t.user_attrs["curve"]["elapsed_s"]) == len(t.user_attrs["curve"]["step"])
