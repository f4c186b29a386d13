"""`amt-search report` on a study in the real PostgreSQL (the ``storage_url`` fixture: a fresh
database on $TEST_DB_URL, default 127.0.0.1:5432, dropped afterwards; a private $AMT_HOME).

The study is made with Optuna directly, its trials carrying the user attributes that
``search.objective`` writes (curve, val_loss, gpu_seconds ...): complete, pruned (Hyperband
after 1 or 3 of 6 evals), failed and running trials, one of them from a different search space
(no dropout). ``build_study`` also serves to look at the figures by hand::

    python -m tests.search.test_report postgresql://postgres@127.0.0.1:5432/somedb /tmp/report
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from search import report
from search.config import search_config_from_dict, search_config_to_dict
from search.errors import SearchError
from search.study import CONFIG_ATTR
from storage import open_storage

ROOT = Path(__file__).resolve().parents[2]
STUDY = "report-test"
EVAL_EVERY = 100
N_EVALS = 6
SPACE = {
    "model.n_layers": IntDistribution(6, 16, step=2),
    "model.d_model": CategoricalDistribution([512, 768, 1024]),
    "optim.lr": FloatDistribution(5e-5, 1e-3, log=True),
    "model.dropout": FloatDistribution(0.0, 0.3),
}
PRUNED_AFTER = {1: 1, 5: 3, 7: 1}  # trial -> the eval Hyperband pruned it at


def search_config(name: str) -> dict[str, object]:
    base = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())
    raw = {
        "name": name,
        "base_train": base,
        "truncation": {
            "max_steps": EVAL_EVERY * N_EVALS,
            "eval_every": EVAL_EVERY,
            "eval_subset": 300,
        },
        "space": {
            "model.n_layers": {"type": "int", "low": 6, "high": 16, "step": 2},
            "model.d_model": {"type": "categorical", "choices": [512, 768, 1024]},
            "optim.lr": {"type": "float", "low": 5e-5, "high": 1e-3, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.3},
        },
        "n_trials": 48,
    }
    return search_config_to_dict(search_config_from_dict(raw))


def build_study(url: str, name: str = STUDY, n_trials: int = 10, seed: int = 0) -> optuna.Study:
    """A study whose trials look like the objective's: every trial reports BLEU-4 at evals
    1..k; trials 1, 5 and 7 were pruned (``PRUNED_AFTER``), trial 4 failed (NaN loss) after 2
    evals, the last one is still running; trial 2 has no dropout (an older search space) and
    trial 3 no loss curve. Each eval took 30 GPU-seconds. Trial 0 is the report's trial 42
    (12 layers, hidden 768, LR 2e-4)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize")
    study._storage.set_study_system_attr(study._study_id, CONFIG_ATTR, search_config(name))
    rng = random.Random(seed)
    for number in range(n_trials):
        params = {
            "model.n_layers": 12 if number == 0 else rng.choice(range(6, 17, 2)),
            "model.d_model": 768 if number == 0 else rng.choice([512, 768, 1024]),
            "optim.lr": 2e-4 if number == 0 else 10 ** rng.uniform(-4.3, -3),
            "model.dropout": round(rng.uniform(0, 0.3), 3),
        }
        dists = dict(SPACE)
        if number == 2:
            del params["model.dropout"], dists["model.dropout"]
        if number == n_trials - 1:
            state, evals = TrialState.RUNNING, 2
        elif number == 4:
            state, evals = TrialState.FAIL, 2
        elif number in PRUNED_AFTER:
            state, evals = TrialState.PRUNED, PRUNED_AFTER[number]
        else:
            state, evals = TrialState.COMPLETE, N_EVALS
        quality = (
            40
            - 9 * abs(math.log10(params["optim.lr"] / 2e-4))
            - abs(params["model.n_layers"] - 12)
            - (6 if state == TrialState.PRUNED else 0)  # Hyperband prunes the weak ones
            + rng.gauss(0, 1.5)
        )
        bleu = [round(quality * (1 - math.exp(-k / 1.5)), 2) for k in range(1, evals + 1)]
        steps = [k * EVAL_EVERY for k in range(1, evals + 1)]
        train = [round(2.0 + 5.0 * math.exp(-s / 150) - (quality - 30) / 25, 4) for s in steps]
        attrs: dict[str, object] = {
            "run_dir": f"/nonexistent/runs/{name}/trial-{number}",
            "n_params": 85_000_000,
            "device": "cuda",
            "wall_seconds": 30.0 * evals,
            "cpu_seconds": 31.0 * evals,
            "gpu_seconds": 30.0 * evals,
            "eval_seconds": 6.0 * evals,
            "val_loss": train[-1] + 0.15,
            "tokens_per_s": 50_000.0,
        }
        if number != 3:
            attrs["curve"] = {
                "step": steps,
                "train_loss": train,
                "val_loss": [
                    round(t + 0.1 + s / 6000, 4) for t, s in zip(train, steps, strict=True)
                ],
                "bleu": bleu,
                "lr": [2e-4] * evals,
            }
        if state == TrialState.FAIL:
            attrs.update(fail_reason="nan_loss", fail_message="loss is NaN at step 250")
        study.add_trial(
            create_trial(
                state=state,
                params=params,
                distributions=dists,
                value=bleu[-1] if state == TrialState.COMPLETE else None,
                intermediate_values=dict(enumerate(bleu, start=1)),
                user_attrs=attrs,
            )
        )
    return study


def write_full_run(run_dir: Path, study: str, trial: int) -> None:
    """What trainer.fit leaves in a promoted run's out_dir: config.yaml with meta, and
    metrics.jsonl (one line per eval)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"meta": {"study": study, "trial": trial}})
    )
    lines = []
    for k in range(1, 31):
        step = k * 2000
        train = 1.6 + 3.0 * math.exp(-step / 8000)
        val = 1.72 + 2.8 * math.exp(-step / 8000) + max(0, step - 48000) / 200000
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "train_loss": train,
                    "val_loss": val,
                    "bleu": 30 + k / 3,
                    "lr": 2e-4,
                }
            )
        )
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]


def test_report_from_live_study(storage_url: str, tmp_path: Path) -> None:
    from search import cli

    build_study(storage_url)
    amt_home = Path(os.environ["AMT_HOME"])  # the fixture's; promoted runs are found there
    write_full_run(amt_home / "runs" / STUDY / "full-trial-0", STUDY, 0)
    # promoted from a deleted study of the same name: trial 1 had other parameters then
    write_full_run(amt_home / "runs" / STUDY / "full-trial-1", STUDY, 1)
    stale = amt_home / "runs" / STUDY / "full-trial-1" / "config.yaml"
    stale.write_text(yaml.safe_dump({"meta": {"study": STUDY, "trial": 1,
                                              "params": {"model.n_layers": 99}}}))
    out = tmp_path / "report"
    code = cli.main(["report", "--study", STUDY, "--storage", storage_url, "--out", str(out)])
    assert code == 0
    for name in (
        "optuna_parallel.png",
        "train_val_loss.png",
        "param_importance.png",
        "intermediate_bleu.png",
    ):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 20_000, name
    text = (out / "REPORT.md").read_text()
    assert "| Trial | Layers | Hidden | LR | BLEU-4 |" in text
    assert "| 0 | 12 | 768 | 2.0e-04 |" in text
    assert "5 complete, 3 pruned, 1 failed, 1 running" in text
    evals = 5 * N_EVALS + sum(PRUNED_AFTER.values()) + 2 + 2  # complete, pruned, failed, running
    assert f"GPU-seconds spent: {30 * evals} " in text
    saved = sum((N_EVALS - k) * 30 for k in PRUNED_AFTER.values())  # (6 - k) x 30 s per eval
    assert f"GPU-seconds saved by pruning: about {saved} " in text
    assert "(max_resource − its last eval)" in text
    assert f"decoding for BLEU-4): {6 * evals} of the {30 * evals} wall-seconds" in text
    assert "(20%)" in text
    assert "promote --study report-test --trial" in text
    for name in ("optuna_parallel.png", "train_val_loss.png", "intermediate_bleu.png"):
        assert f"]({name})" in text
    # the full run: not finished (no result.json), then finished with its test-split BLEU-4
    assert "## Full runs" in text and "full-trial-0`: not finished" in text
    assert "full-trial-1" not in text
    assert "last eval at step 60000, BLEU-4 40.00" in text
    # damaged files of a run: a bad byte, wrong types; the report skips what it cannot read
    run0 = amt_home / "runs" / STUDY / "full-trial-0"
    with (run0 / "metrics.jsonl").open("ab") as f:
        f.write(b'garbage\xff\n{"step": "x", "bleu": [1], "train_loss": 1, "val_loss": 1}\n')
    (run0 / "result.json").write_text('{"bleu": "x", "test_bleu": [1]}')
    assert cli.main(["report", "--study", STUDY, "--storage", storage_url, "--out",
                     str(out)]) == 0
    assert "last eval at step 60000, BLEU-4 40.00" in (out / "REPORT.md").read_text()
    (amt_home / "runs" / STUDY / "full-trial-0" / "result.json").write_text(json.dumps(
        {"steps": 60000, "stopped_by": "budget", "bleu": 40.0, "test_bleu": 38.5,
         "val_loss": 1.87}))
    assert cli.main(["report", "--study", STUDY, "--storage", storage_url, "--out",
                     str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert ("full-trial-0`: 60000 steps, stopped by budget; BLEU-4 40.00 on the validation "
            "subset, **38.50 on the test split**; val loss 1.8700") in text


def test_figures_have_labels_and_lines(storage_url: str, tmp_path: Path) -> None:
    study = build_study(storage_url)
    cfg = search_config_from_dict(search_config(STUDY))
    trials = study.get_trials()
    run = tmp_path / "full-trial-0"
    write_full_run(run, STUDY, 0)
    curves, missing = report.collect_curves(trials, [0, 3, 7], [run])
    assert [c.label for c in curves] == [
        f"trial 0 (BLEU-4 {trials[0].value:.2f})",
        "trial 7 (pruned)",
        "full run of trial 0",
    ]
    assert len(missing) == 1 and missing[0].startswith("trial 3: no `curve`")
    figures = {
        "parallel": report.parallel_figure(study, cfg),
        "loss": report.loss_figure(curves, STUDY),
        "importance": report.importance_figure(study),
        "intermediate": report.intermediate_figure(trials, cfg, STUDY),
    }
    for name, fig in figures.items():
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name
            assert ax.lines or ax.patches, f"{name}: an empty panel"
    assert "n/a" in _texts(figures["parallel"])  # trial 2 has no dropout
    loss_axes = figures["loss"].axes
    assert [ax.get_title() for ax in loss_axes] == ["trials (truncated budget)", "full runs"]
    assert {ln.get_linestyle() for ln in loss_axes[0].lines} == {"-", "--"}
    pruned_marks = [ln for ln in figures["intermediate"].axes[0].lines if ln.get_marker() == "x"]
    assert len(pruned_marks) == 3


def test_edge_cases(storage_url: str, tmp_path: Path) -> None:
    """No complete trial, one trial, no curves: the report says what is missing."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="empty", storage=open_storage(storage_url), direction="maximize"
    )
    study._storage.set_study_system_attr(study._study_id, CONFIG_ATTR, search_config("empty"))
    text = report.write_report("empty", tmp_path / "empty", storage_url).read_text()
    assert "0 complete" in text and "*No complete trial yet.*" in text
    assert "best trial: none yet" in text
    assert not list((tmp_path / "empty").glob("*.png"))
    assert text.count("*Not drawn:") == 4

    build_study(storage_url, "one", n_trials=1 + 1)  # trial 0 complete, trial 1 running
    out = tmp_path / "one"
    text = report.write_report("one", out, storage_url, trials=[0, 1]).read_text()
    assert (out / "optuna_parallel.png").exists() and (out / "intermediate_bleu.png").exists()
    assert "*Not drawn: 1 complete trial(s); PED-ANOVA importance needs at least 3.*" in text
    assert not (out / "param_importance.png").exists()

    # every complete trial on one score (all 0.00: nothing learned): no importance drawn
    flat = optuna.create_study(study_name="flat", storage=open_storage(storage_url),
                               direction="maximize")
    flat._storage.set_study_system_attr(flat._study_id, CONFIG_ATTR, search_config("flat"))
    for lr in (1e-4, 2e-4, 3e-4):
        flat.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0,
                                    params={"optim.lr": lr},
                                    distributions={"optim.lr": SPACE["optim.lr"]}))
    with pytest.raises(report.NothingToPlot, match="every complete trial scored BLEU-4 0.00"):
        report.importance_figure(flat)

    # a stale trial and its waiting retry are one trial; the line says so and adds up
    study = optuna.load_study(study_name="one", storage=open_storage(storage_url))
    stopped = study.trials[1]
    study.add_trial(create_trial(state=TrialState.WAITING, params=stopped.params,
                                 distributions=stopped.distributions,
                                 system_attrs={"failed_trial": 1, "retry_history": [1]}))
    text = report.write_report("one", out, storage_url).read_text()
    assert ("- trials: 2 (1 complete, 0 pruned, 0 failed, 0 running, 1 waiting; a retried "
            "trial counts once: 1 earlier attempt that a retry replaced)") in text

    with pytest.raises(SearchError, match=r"no study named 'nope' .*studies: empty, flat, one"):
        report.write_report("nope", tmp_path / "x", storage_url)
    with pytest.raises(SearchError, match=r"--trials: 9 not in the study \(trials: 0, 1, 2\)"):
        report.write_report("one", out, storage_url, trials=[9])


def test_unknown_study_is_one_line(storage_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from search import cli

    build_study(storage_url, "known", n_trials=2)
    assert (
        cli.main(["report", "--study", "nope", "--storage", storage_url, "--out", "/tmp/x"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("amt-search: error: no study named 'nope'") and "known" in err
    assert err.count("\n") == 1


if __name__ == "__main__":
    build_study(sys.argv[1], n_trials=int(sys.argv[3]) if len(sys.argv) > 3 else 30, seed=1)
    write_full_run(Path(os.environ["AMT_HOME"]) / "runs" / STUDY / "full-trial-0", STUDY, 0)
    print(report.write_report(STUDY, sys.argv[2], sys.argv[1]))
