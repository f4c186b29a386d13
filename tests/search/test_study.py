"""create-study, load, the leaderboard, promote's config and the worker's trial handling, on
real PostgreSQL. Training is replaced by a fake ``trainer.fit`` here (test_e2e trains)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import trainer
from search import leaderboard
from search.cli import main
from search.config import load_search_config
from search.errors import SearchError
from search.promote import promote
from search.study import CONFIG_ATTR, count_trials, create_study, load_study
from search.worker import run_worker
from storage import open_storage
from storage.checkpoints import latest_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_config
from trainer.errors import ConfigError, TrainingFailed
from trainer.loop import FitResult

pytestmark = pytest.mark.usefixtures("storage_url")


def test_create_study_stores_config_and_enqueues_report_trials_first(
    write_search: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create-study", "--config", str(write_search())]) == 0
    study, cfg = load_study("tiny")
    stored = study._storage.get_study_system_attrs(study._study_id)[CONFIG_ATTR]
    assert stored["name"] == "tiny" and stored["base_train"]["model"]["d_model"] == 32
    assert cfg == load_search_config(write_search())
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.number for t in waiting] == [0, 1, 2]
    assert [leaderboard.trial_params(t) for t in waiting] == [dict(e) for e in cfg.enqueue]

    assert main(["create-study", "--config", str(write_search())]) == 2
    assert ("study 'tiny' already exists" in (err := capsys.readouterr().err)
            and "amt-search delete-study --study tiny" in err)
    assert main(["create-study", "--config", str(write_search()), "--skip-if-exists"]) == 0
    assert len(load_study("tiny")[0].trials) == 3  # nothing enqueued twice
    capsys.readouterr()
    assert main(["status"]) == 0  # the only study: no --study needed
    assert "study tiny: 0/8 finished" in capsys.readouterr().out
    assert main(["create-study", "--config", str(write_search()), "--study-name", "t2"]) == 0
    assert load_study("t2")[1].name == "t2"
    assert main(["trials"]) == 2
    err = capsys.readouterr().err
    assert "--study is needed: " in err and "2 studies: t2, tiny" in err


@pytest.mark.usefixtures("restore_signals")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() stands in for a worker
def test_delete_study_removes_the_study_and_its_trial_runs_not_the_full_runs(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    from search.objective import run_dir

    monkeypatch.setattr(trainer, "fit", _fake_fit([]))
    create_study(load_search_config(write_search(n_trials=3)))
    assert run_worker("tiny", gpu=None) == 0
    root = run_dir("tiny", 0).parent
    assert len(list(root.glob("trial-*"))) == 3
    (root / "full-trial-0").mkdir()  # a promoted full run: a trained model
    study = load_study("tiny")[0]
    study.enqueue_trial({"optim.lr": 3e-3})
    running = study.ask()  # a worker at work
    capsys.readouterr()
    assert main(["delete-study", "--study", "tiny", "--yes"]) == 2
    assert "1 running trial(s) (3): stop its workers first" in capsys.readouterr().err
    study.tell(running, 1.0)
    assert main(["delete-study", "--study", "tiny"]) == 2  # no terminal to ask on
    assert ("this would delete study tiny (4 trials) and 3 trial run directories"
            in capsys.readouterr().err)
    assert len(load_study("tiny")[0].trials) == 4  # nothing deleted
    assert main(["delete-study", "--study", "tiny", "--yes"]) == 0
    assert "these stay: " in (out := capsys.readouterr().out) and "full-trial-0" in out
    with pytest.raises(SearchError, match="no study named 'tiny'"):
        load_study("tiny")
    assert [p.name for p in root.iterdir()] == ["full-trial-0"]
    assert main(["create-study", "--config", str(write_search())]) == 0  # the name is free


def test_launch_s_progress_line_survives_its_study_being_deleted(
    write_search: Callable[..., Path]
) -> None:
    from search.launch import _safe_progress_line

    create_study(load_search_config(write_search()))
    study = load_study("tiny")[0]
    assert _safe_progress_line(study, 8, []).startswith("[launch] 0/8 finished")
    optuna.delete_study(study_name="tiny", storage=open_storage())
    assert "study tiny was deleted: 0/0 workers alive" in _safe_progress_line(study, 8, [])


def test_create_study_is_all_or_nothing(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_search_config(write_search())
    storage = open_storage()
    # a create-study killed after creating the study, before storing its config
    optuna.create_study(study_name="tiny", storage=storage)
    with pytest.raises(SearchError, match="has no amt-search config"):
        load_study("tiny")
    create_study(cfg, skip_if_exists=True)  # completes it instead of failing forever
    assert len(load_study("tiny")[0].trials) == 3
    # a failure while enqueueing leaves no study behind
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("connection lost")

    monkeypatch.setattr(optuna.Study, "enqueue_trial", broken)
    with pytest.raises(RuntimeError, match="connection lost"):
        create_study(cfg, study_name="t3")
    assert "t3" not in [s.study_name for s in optuna.get_all_study_summaries(storage)]


def test_relative_corpus_paths_are_stored_absolute(
    write_search: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_search()
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    corpus = Path(train["data"]["path"])
    train["data"]["path"] = corpus.name  # relative to the directory create-study runs in
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    monkeypatch.chdir(corpus.parent)
    create_study(load_search_config(path))
    monkeypatch.chdir("/")  # a worker started elsewhere finds the same file
    assert load_study("tiny")[1].base_train["data"]["path"] == str(corpus)


def test_skip_if_exists_warns_when_the_config_changed(
    write_search: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    create_study(load_search_config(write_search()))
    create_study(load_search_config(write_search()), skip_if_exists=True)
    assert "another configuration" not in caplog.text
    changed = load_search_config(write_search(n_trials=9))
    assert len(create_study(changed, skip_if_exists=True).trials) == 3  # the stored one kept
    assert "study tiny exists with another configuration (n_trials differ)" in caplog.text
    assert load_study("tiny")[1].n_trials == 8


@pytest.mark.usefixtures("restore_signals")
def test_a_corpus_broken_after_create_study_loses_no_trial(
    write_search: Callable[..., Path], tmp_path: Path
) -> None:
    """The corpus goes missing between create-study and the worker: the worker stops with the
    one-line error, its trial records why and goes back to the queue, and a worker run after
    the fix finds every warm start still there."""
    path = write_search()
    create_study(load_search_config(path))
    corpus = Path(yaml.safe_load((tmp_path / "train.yaml").read_text())["data"]["path"])
    saved = corpus.read_bytes()
    corpus.unlink()
    with pytest.raises(ConfigError, match="file not found"):
        run_worker("tiny", gpu=None, n_trials=1)
    study, _ = load_study("tiny")
    t0 = study.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["fail_reason"] == "config"
    assert "file not found" in t0.user_attrs["fail_message"]
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == t0.params
    assert count_trials(study.trials).failed == 0  # retried: the study lost nothing
    corpus.write_bytes(saved)


@pytest.mark.usefixtures("restore_signals")
def test_a_corpus_edited_after_create_study_stops_the_worker(
    write_search: Callable[..., Path], tmp_path: Path
) -> None:
    """Pairs added to the corpus file after create-study: the next trial would train and score
    on other splits than the earlier ones, so the worker stops, the trial goes back to the
    queue, and the one line names the file."""
    create_study(load_search_config(write_search()))
    corpus = Path(yaml.safe_load((tmp_path / "train.yaml").read_text())["data"]["path"])
    saved = corpus.read_bytes()
    with corpus.open("a", encoding="utf-8") as f:
        f.write("a new source\ta new target\n")
    with pytest.raises(ConfigError, match=r"data.path: .*: the file changed since create-study"):
        run_worker("tiny", gpu=None, n_trials=1)
    study, _ = load_study("tiny")
    assert study.trials[0].user_attrs["fail_reason"] == "config"
    assert study.trials[-1].state == TrialState.WAITING
    corpus.write_bytes(saved)


# each value valid alone; d_model 36 with 8 heads is no model (heads of 4.5)
HEADS_PAIR_SPACE = {"model.d_model": {"type": "categorical", "choices": [32, 36]},
                    "model.n_heads": {"type": "categorical", "choices": [2, 8]}}


@pytest.mark.usefixtures("restore_signals")
def test_an_invalid_combination_fails_its_trial_and_the_worker_goes_on(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Each value passes create-study's checks alone; together they make no model: that
    trial fails (not retried) and the worker runs the next one."""
    calls: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(trainer, "fit", _fake_fit(calls))
    create_study(load_search_config(write_search(space=HEADS_PAIR_SPACE, enqueue=None,
                                                 n_trials=2)))
    study, _ = load_study("tiny")
    study.enqueue_trial({"model.d_model": 36, "model.n_heads": 8})  # 36 heads of 4.5
    study.enqueue_trial({"model.d_model": 32, "model.n_heads": 8})
    assert run_worker("tiny", gpu=None) == 0
    trials = load_study("tiny")[0].trials
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == "invalid_params"
    assert "model.d_model=36 is not divisible by model.n_heads=8" in (
        trials[0].user_attrs["fail_message"])
    assert trials[1].state == TrialState.COMPLETE and len(trials) == 2
    from search.launch import launch

    assert launch("tiny", cpu_workers=1) == 0  # done: no worker started
    assert "[launch] study tiny is done: 2/2 trials finished" in capsys.readouterr().out


def test_a_space_without_a_valid_combination_is_refused(
    write_search: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each end is valid alone (the other key at its base value), no pair is: create-study
    samples combinations and refuses; a space where some are invalid gets a warning."""
    space = {"data.max_src_tokens": {"type": "int", "low": 70, "high": 90},
             "data.max_tgt_tokens": {"type": "int", "low": 70, "high": 90}}
    path = write_search(space=space, enqueue=None)
    train = yaml.safe_load((tmp_path / "train.yaml").read_text())
    train["model"]["max_len"] = 128  # 90 + 30 fits in 128 positions, 70 + 70 does not
    train["data"].update(max_src_tokens=30, max_tgt_tokens=30)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    with pytest.raises(SearchError, match=r"space: none of 256 random points is a valid "
                       r"combination \(e.g. data.max_src_tokens=\d+, data.max_tgt_tokens=\d+: "):
        create_study(load_search_config(path))
    from storage.errors import StorageError

    with pytest.raises(StorageError, match="no amt-search studies"):  # nothing was created
        load_study("tiny")
    create_study(load_search_config(write_search(space=HEADS_PAIR_SPACE, enqueue=None)))
    assert "random points are invalid combinations (e.g. model.d_model=36, " in caplog.text


@pytest.mark.usefixtures("restore_signals")
def test_a_file_where_a_trial_run_directory_goes_is_replaced(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.objective import run_dir

    monkeypatch.setattr(trainer, "fit", _fake_fit([]))
    create_study(load_search_config(write_search(n_trials=3)))
    run_dir("tiny", 0).parent.mkdir(parents=True)
    run_dir("tiny", 0).write_text("not a directory")
    run_dir("tiny", 1).symlink_to("/nonexistent")
    assert run_worker("tiny", gpu=None) == 0
    trials = load_study("tiny")[0].trials
    assert count_trials(trials).finished == 3 and count_trials(trials).failed == 0
    assert run_dir("tiny", 0).is_dir() and not run_dir("tiny", 1).is_symlink()


def test_a_trial_budget_beyond_the_full_run_warns(
    write_search: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    create_study(load_search_config(write_search(truncation={
        "max_steps": 80, "eval_every": 8, "eval_subset": 16})))  # the full run has 60
    assert ("truncation.max_steps=80 is more than the full run's train.max_steps=60 "
            "(train.yaml)") in caplog.text


@pytest.mark.parametrize(("pruner", "truncation", "says"), [
    ({"type": "hyperband", "min_resource": 5}, {}, "hyperband can never stop a trial early: "
     "its first rung is at eval 5 and a trial makes 5 evals"),
    ({"type": "hyperband"}, {"eval_every": 40}, "its first rung is at eval 1 and a trial "
     "makes 1 eval;"),
    ({"type": "median", "n_warmup_evals": 9}, {}, "pruner.n_warmup_evals=9 and a trial makes"),
    ({"type": "median", "n_startup_trials": 8}, {}, "pruner.n_startup_trials=8 and the study "
     "runs n_trials=8"),
])
def test_a_pruner_that_can_never_prune_warns(
    write_search: Callable[..., Path], caplog: pytest.LogCaptureFixture,
    pruner: dict[str, Any], truncation: dict[str, Any], says: str
) -> None:
    trunc = {"max_steps": 40, "eval_every": 8, "eval_subset": 16, **truncation}
    create_study(load_search_config(write_search(pruner=pruner, truncation=trunc)))
    assert says in caplog.text


def test_fixed_heads_with_a_searched_width_warn(write_search: Callable[..., Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    create_study(load_search_config(write_search(overrides={"model.n_heads": 2})))
    assert ("overrides.model.n_heads=2 holds for every searched model.d_model: "
            "derive.head_dim is not used") in caplog.text


def test_the_default_pruner_does_not_warn(write_search: Callable[..., Path],
                                          caplog: pytest.LogCaptureFixture) -> None:
    create_study(load_search_config(write_search()))
    assert "can never stop" not in caplog.text


@pytest.mark.usefixtures("restore_signals")
def test_trials_invalid_in_a_row_stop_the_worker(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A space that (almost) only draws invalid combinations would fail trials in a loop:
    the worker stops after MAX_INVALID_IN_A_ROW of them with one line."""
    from search import worker

    monkeypatch.setattr(worker, "MAX_INVALID_IN_A_ROW", 2)
    monkeypatch.setattr(trainer, "fit", _fake_fit([]))
    create_study(load_search_config(write_search(space=HEADS_PAIR_SPACE, enqueue=None,
                                                 n_trials=9)))
    study, _ = load_study("tiny")
    for _ in range(2):
        study.enqueue_trial({"model.d_model": 36, "model.n_heads": 8})
    with pytest.raises(SearchError, match=r"2 trials in a row drew parameters that make no "
                       r"valid config .*narrow its ranges"):
        run_worker("tiny", gpu=None)
    assert count_trials(load_study("tiny")[0].trials).failed == 2


@pytest.mark.usefixtures("restore_signals")
def test_a_run_directory_damaged_under_a_trial_is_retried_once(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(trainer, "fit", _fake_fit(calls))
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True}}
    path = write_search(enqueue=[{"optim.lr": RUN_DIR_LR}], space=space, n_trials=2)
    create_study(load_search_config(path))
    assert run_worker("tiny", gpu=None) == 0  # no traceback, the worker goes on
    trials = load_study("tiny")[0].trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in failed] == ["run_dir", "run_dir"]
    assert "trial-0/metrics.jsonl: No such file or directory" in failed[0].user_attrs[
        "fail_message"]
    assert failed[1].system_attrs["failed_trial"] == 0  # one retry, then it stays failed
    assert count_trials(trials).finished == 2
    said = [r.getMessage() for r in caplog.records if "failed (run_dir)" in r.getMessage()]
    assert [m.split(":")[0] for m in said] == [  # the log tells which one is retried
        "trial 0 failed (run_dir), retrying",
        f"trial {failed[1].number} failed (run_dir), not retried (retry limit reached)"]


@pytest.mark.usefixtures("restore_signals")
def test_a_study_deleted_under_a_worker_ends_it_with_one_line(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(trainer, "fit", _fake_fit(calls))
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True}}
    create_study(load_search_config(write_search(enqueue=[{"optim.lr": DELETE_LR}],
                                                 space=space, n_trials=2)))
    with pytest.raises(SearchError, match=r"study tiny \(or its running trial\) was deleted "
                       r"while this worker ran"):
        run_worker("tiny", gpu=None)


def test_a_restarted_worker_draws_other_trials(write_search: Callable[..., Path]) -> None:
    create_study(load_search_config(write_search()))
    study, _ = load_study("tiny", worker_index=0)
    first = study.sampler._rng.rng.random()  # type: ignore[attr-defined]
    assert load_study("tiny", worker_index=0)[0].sampler._rng.rng.random() == first  # type: ignore[attr-defined]
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    again = load_study("tiny", worker_index=0)[0].sampler._rng.rng.random()  # type: ignore[attr-defined]
    assert again != first


def test_unknown_study_lists_the_existing_ones(write_search: Callable[..., Path]) -> None:
    create_study(load_search_config(write_search()))
    with pytest.raises(SearchError, match=r"no study named 'nope' .*\(studies: tiny\)"):
        load_study("nope")


# ---------------------------------------------------------------------------------------------
# the worker, with a fake trainer.fit

NAN_LR = 0.5  # an enqueued trial with this LR "diverges"
SIGTERM_LR = 0.25  # ... and with this one the worker gets SIGTERM at its second eval
RUN_DIR_LR = 0.125  # ... and with this one its run directory vanishes
DELETE_LR = 0.0625  # ... and with this one the study is deleted


def _fake_fit(calls: list[tuple[TrainConfig, bool]]) -> Callable[..., FitResult]:
    """Evaluates every eval_every steps (BLEU grows with d_model and steps), checkpoints
    each eval, calls the callbacks as trainer.fit does."""

    def fit(cfg: TrainConfig, callbacks: Any = (), *, resume: bool = False) -> FitResult:
        calls.append((cfg, resume))
        if cfg.optim.lr == NAN_LR:
            raise TrainingFailed("non-finite loss at step 3", reason="nan_loss")
        out = Path(cfg.train.out_dir)
        if cfg.optim.lr == RUN_DIR_LR:  # someone deleted the run directory under the trial
            raise FileNotFoundError(2, "No such file or directory", str(out / "metrics.jsonl"))
        if cfg.optim.lr == DELETE_LR:  # someone deleted the study under the trial
            optuna.delete_study(study_name="tiny", storage=open_storage())
        ckpt = latest_checkpoint(out) if resume else None
        start = int(ckpt.stem.split("_")[1]) if ckpt else 0
        history = []
        for step in range(start + cfg.train.eval_every, cfg.train.max_steps + 1,
                          cfg.train.eval_every):
            m = {"step": step, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3,
                 "tokens_per_s": 100.0, "bleu": cfg.model.d_model * step / 100, "eval_s": 0.0}
            history.append(m)
            save_checkpoint(out, step, {"step": torch.tensor(step)})
            if cfg.optim.lr == SIGTERM_LR and step == 2 * cfg.train.eval_every and not resume:
                os.kill(os.getpid(), signal.SIGTERM)
            for cb in callbacks:
                cb.on_eval(step, dict(m))
                cb.on_step(step)
        last = history[-1]
        return FitResult(bleu=last["bleu"], val_loss=1.0, best_val_loss=1.0, best_step=step,
                         steps=step, tokens=step * 10, tokens_per_s=100.0, wall_s=1.0,
                         history=history, checkpoint=str(latest_checkpoint(out)),
                         checkpoint_sha256="0" * 64, stopped_by="budget")

    return fit


@pytest.mark.usefixtures("restore_signals")
def test_worker_nan_fails_for_good_sigterm_retries_and_resumes(
    write_search: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[TrainConfig, bool]] = []
    monkeypatch.setattr(trainer, "fit", _fake_fit(calls))
    enqueue = [{"optim.lr": SIGTERM_LR}, {"optim.lr": NAN_LR}, {"optim.lr": 3e-3}]
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
             "model.d_model": {"type": "categorical", "choices": [32, 64]}}
    path = write_search(enqueue=enqueue, space=space, n_trials=5)
    create_study(load_search_config(path))

    # SIGTERM during trial 0: it saves, is re-enqueued, the worker leaves with 0
    assert run_worker("tiny", gpu=None) == 0
    study, _ = load_study("tiny")
    t0 = study.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["fail_reason"] == "stopped"
    retry = study.trials[-1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert len(t0.intermediate_values) == 2

    # the next worker: NaN fails for good and is not retried; the retry resumes; the rest
    assert run_worker("tiny", gpu=None) == 0
    trials = {t.number: t for t in load_study("tiny")[0].trials}
    resumed = trials[retry.number]
    assert resumed.state == TrialState.COMPLETE and resumed.user_attrs["resumed_from"] == 0
    # fit(resume=True) on the retry's own run directory, a copy of trial 0's
    assert [r for c, r in calls if c.train.out_dir.endswith(f"trial-{retry.number}")] == [True]
    assert min(resumed.intermediate_values) == 3  # continued after trial 0's eval 2
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["fail_reason"] == "nan_loss"
    assert not any(t.system_attrs.get("failed_trial") == 1 for t in trials.values())
    counts = count_trials(list(trials.values()))
    assert (counts.finished, counts.failed, counts.running, counts.waiting) == (5, 1, 0, 0)
    assert len(trials) == 6  # 5 chains, one of them retried once: exactly n_trials
    done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    for t in done:
        assert {"val_loss", "curve", "cpu_seconds", "n_params", "checkpoint",
                "checkpoint_sha256", "best_step", "tokens_per_s", "eval_seconds",
                "timing"} <= set(t.user_attrs)
        timing = t.user_attrs["timing"]
        assert (timing["fit_started_at"] <= timing["first_step_at"] <= timing["second_step_at"]
                <= timing["fit_ended_at"])
        assert t.user_attrs["eval_seconds"] == 0.0  # the fake fit's evaluations take no time


# ---------------------------------------------------------------------------------------------
# leaderboard and promote on hand-made trials


def _add(study: optuna.Study, params: dict[str, Any], state: TrialState,
         value: float | None = None, inter: dict[int, float] | None = None) -> None:
    dists = {
        "model.n_layers": optuna.distributions.IntDistribution(1, 2),
        "model.d_model": optuna.distributions.CategoricalDistribution([32, 64]),
        "optim.lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
    }
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=dists, state=state, value=value,
        intermediate_values=inter or {}, user_attrs={"cpu_seconds": 12.5},
    ))


def test_leaderboard_formats_and_promote(
    write_search: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture
) -> None:
    create_study(load_search_config(write_search(enqueue=[])))
    study, cfg = load_study("tiny")
    _add(study, {"model.n_layers": 2, "model.d_model": 64, "optim.lr": 2e-3},
         TrialState.COMPLETE, 9.5, {1: 3.0, 5: 9.5})
    _add(study, {"model.n_layers": 1, "model.d_model": 32, "optim.lr": 1e-2},
         TrialState.PRUNED, None, {1: 1.25})
    _add(study, {"model.n_layers": 1, "model.d_model": 64, "optim.lr": 3e-3},
         TrialState.COMPLETE, 11.0, {1: 4.0, 5: 11.0})

    rows = leaderboard.trial_rows(study, cfg)
    assert [r["trial"] for r in rows] == [2, 0, 1]
    table = leaderboard.format_rows(rows, "table").splitlines()
    assert table[0].split("|")[1:-1] == [
        " Trial ", " Layers ", " Hidden ", " LR      ", " BLEU-4 ", " State    ", " Evals ",
        " CPU-s ",
    ]
    assert "| 2     | 1      | 64     | 3.0e-03 | 11.00  | COMPLETE |" in table[2]
    assert "(1.25)" in table[4] and "PRUNED" in table[4]
    assert json.loads(leaderboard.format_rows(rows, "json"))[0]["params"]["optim.lr"] == 3e-3
    csv_lines = leaderboard.format_rows(rows, "csv").splitlines()
    assert csv_lines[0].startswith("trial,layers,hidden")
    assert csv_lines[0].endswith(",model.d_model,model.n_layers,optim.lr")  # every parameter
    assert csv_lines[1].endswith(",64,1,0.003")

    assert main(["best", "--study", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("best trial: 2 (BLEU-4 11.00)")
    assert "promote --study tiny --trial 2" in out
    assert main(["status", "--study", "tiny", "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["complete"], status["pruned"], status["best_trial"]) == (2, 1, 2)

    path = promote("tiny", 2, out=tmp_path / "full.yaml")
    # added by hand, as a trial told from the dashboard would be: promoted, with a warning
    assert "trial 2 was not run by an amt-search worker" in caplog.text
    assert "outside the study's space" not in caplog.text
    full = load_config(path)
    assert (full.model.n_layers, full.model.d_model, full.model.n_heads, full.optim.lr) == (
        1, 64, 4, 3e-3)
    assert full.train.max_steps == 60 and full.train.eval_every == 20  # no truncation
    assert full.eval.test  # the full run ends with BLEU-4 on the test split
    assert full.meta["study"] == "tiny" and full.meta["trial"] == 2
    assert full.train.out_dir.endswith("runs/tiny/full-trial-2")
    assert full.meta["storage"].startswith("postgresql")
    assert yaml.safe_load(path.read_text())["meta"]["params"]["model.d_model"] == 64
    assert "changed since create-study" not in caplog.text
    corpus = Path(yaml.safe_load((tmp_path / "train.yaml").read_text())["data"]["path"])
    with corpus.open("a", encoding="utf-8") as f:
        f.write("a new source\ta new target\n")
    promote("tiny", 2, out=tmp_path / "full.yaml")  # promoted on the new pairs, with a warning
    assert "the file changed since create-study: the full run trains" in caplog.text

    with pytest.raises(SearchError, match=r"trial 7 is not in study 'tiny' .*complete: 0, 2"):
        promote("tiny", 7)
    with pytest.raises(SearchError, match=r"trial 1 .* is PRUNED, not COMPLETE"):
        promote("tiny", 1)
    assert main(["promote", "--study", "tiny", "--trial", "7"]) == 2
    assert "amt-search: error: trial 7" in capsys.readouterr().err


def test_train_command_uses_torchrun_on_several_gpus(tmp_path: Path) -> None:
    from search.promote import train_command

    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump({"train": {"out_dir": str(tmp_path / "run")}}))
    cmd, env = train_command(config, [])
    assert cmd[1:] == ["-m", "trainer.cli", "--config", str(config)]
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    save_checkpoint(tmp_path / "run", 5, {"step": torch.tensor(5)})  # a run to continue
    cmd, env = train_command(config, [2, 3])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:] == ["-m", "trainer.cli", "--config", str(config), "--resume"]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    # the checkpoint of the same settings resumes; one of a run with others is refused
    from trainer.config import config_from_dict, config_to_dict

    same = config_to_dict(config_from_dict(yaml.safe_load(config.read_text())))
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(same))
    assert train_command(config, [])[0][-1] == "--resume"
    other = {**same, "train": {**same["train"], "max_steps": 60}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(SearchError, match=r"holds a checkpoint of a run with other settings "
                       r"\(train.max_steps differ\): continue that run with amt-train"):
        train_command(config, [])


def test_pruning_callback_never_prunes_at_the_budgets_last_eval() -> None:
    """A rung can fall on the last eval (8 evals, rungs at 2 and 8): the trial has spent its
    budget by then, so it is reported but not pruned; earlier evals are."""
    import threading

    from search.objective import Pruned, PruningCallback

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return True

    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    trial = study.ask()
    callback = PruningCallback(trial, 10, threading.Event(), n_evals=8)
    metrics = {"bleu": 12.0, "val_loss": 2.0, "tokens_per_s": 1.0}
    with pytest.raises(Pruned, match="pruned at eval 7"):
        callback.on_eval(70, metrics)
    callback.on_eval(80, metrics)  # the last eval: reported, not pruned
    assert study.trials[0].intermediate_values == {7: 12.0, 8: 12.0}


def test_run_dirs_of_a_study_in_another_storage_are_refused() -> None:
    from search.objective import claim_run_dirs

    claim_run_dirs("tiny", "127.0.0.1:5432/a", 1)
    claim_run_dirs("tiny", "127.0.0.1:5432/a", 2)  # deleted and made again in the same database
    with pytest.raises(SearchError, match=r"study 'tiny' in another storage \(127.0.0.1:5432/a\)"):
        claim_run_dirs("tiny", "127.0.0.1:5432/b", 1)


def test_create_study_refuses_a_name_whose_runs_are_another_storages(
    write_search: Callable[..., Path]
) -> None:
    """Its workers would refuse to run: create-study says so first and makes nothing."""
    from search.objective import claim_run_dirs

    claim_run_dirs("tiny", "PostgreSQL 1/other (elsewhere:5432/other)", 1)
    with pytest.raises(SearchError, match=r"holds the trial runs of study 'tiny' in another "
                       r"storage .*--study-name"):
        create_study(load_search_config(write_search()))
    assert "tiny" not in [s.study_name for s in optuna.get_all_study_summaries(open_storage())]


def test_concurrent_create_studies_make_one(write_search: Callable[..., Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cfg = load_search_config(write_search())
    with ThreadPoolExecutor(4) as pool:  # none may take another's study for a half-made one
        studies = list(pool.map(lambda _: create_study(cfg, skip_if_exists=True), range(4)))
    assert {s.study_name for s in studies} == {"tiny"}
    assert len(load_study("tiny")[0].trials) == 3


def test_failed_trials_say_why_in_the_table() -> None:
    from search.leaderboard import _state

    assert _state({"state": "FAIL", "fail_reason": "stopped"}) == "STOPPED"  # retry queued
    assert _state({"state": "FAIL", "fail_reason": "nan_loss"}) == "FAIL (nan_loss)"
    assert _state({"state": "FAIL", "fail_reason": None}) == "FAIL"
    assert _state({"state": "COMPLETE", "fail_reason": None}) == "COMPLETE"
