"""``amt-train`` / ``python run_train.py`` as a user runs them.

A few cases run as real subprocesses (exit status, no traceback on stderr); the others call
``trainer.cli.main`` in-process, which is the same code without the start-up cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.synthetic import write_task
from trainer.cli import main
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = [  # configs/tiny.yaml on the synthetic task, a few milliseconds per step
    "--config", "configs/tiny.yaml", "--set", "data.source=tsv", "--set", "data.vocab_size=300",
    "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "data.val_fraction=0.1",
    "--set", "train.tokens_per_batch=512", "--set", "train.eval_every=2",
    "--set", "train.eval_subset=4", "--set", "train.eval_max_new_tokens=4",
]


def run_train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "run_train.py", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def user_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run main in-process; it must exit 2 with one ``amt-train: error:`` line (the last)."""
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("amt-train: error: ")
    assert sum(x.startswith("amt-train:") for x in lines) == 1
    return lines[-1]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "task.tsv")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name", ["train.yaml", "bible.yaml", "tiny.yaml"])
def test_shipped_configs_load(name: str) -> None:
    load_config(ROOT / "configs" / name)


def test_describe_report_shape_without_data(capsys: pytest.CaptureFixture[str]) -> None:
    proc = run_train("--config", "configs/train.yaml", "--describe",
                     env={"AMT_HOME": "/nonexistent"})  # loads no data, builds no cache
    assert proc.returncode == 0, proc.stderr
    assert "non_embedding:   85,054,464 (85.1 M)" in proc.stdout
    assert main(["--config", "configs/train.yaml", "--describe", "--set",
                 "model.n_layers=6"]) == 0
    assert "non_embedding:   42,527,232 (42.5 M)" in capsys.readouterr().out
    # a section as the value changes the keys it names, the rest of the section stays
    assert main(["--config", "configs/train.yaml", "--describe", "--set",
                 "model={n_layers: 6}"]) == 0
    assert "non_embedding:   42,527,232 (42.5 M)" in capsys.readouterr().out


def test_bad_config_subprocess_one_line_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -1\n")
    proc = run_train("--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr == f"amt-train: error: {path}: optim.lr must be > 0, got -1.0\n"


@pytest.mark.parametrize(("yaml_text", "needle"), [
    ("model:\n  n_layer: 3\n", "unknown key 'model.n_layer'"),
    ("train:\n  precision: fp8\n", "train.precision must be one of"),
    ("train:\n  compile_wrapper: cuda\n", "train.compile_wrapper must be one of"),
    ("model:\n  d_model: 100\n  n_heads: 12\n", "model.n_heads"),
    ("optim:\n  warmup: -0.5\n", "optim.warmup"),
    ("optim: [1, 2\n", "line 2"),
])
def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  yaml_text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    line = user_error(capsys, "--config", str(path))
    assert needle in line and str(path) in line


def test_bad_override_and_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert "key.path=value" in user_error(capsys, "--config", "configs/tiny.yaml",
                                          "--set", "optim.lr")
    assert "train.grad_accum" in user_error(capsys, "--config", "configs/tiny.yaml",
                                            "--set", "train.grad_accum=0")
    assert "nope.yaml" in user_error(capsys, "--config", "nope.yaml")


def test_train_resume_and_failures(task: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    common = [*TINY, "--set", f"data.path={task}", "--set", f"data.cache_dir={tmp_path}/cache",
              "--out-dir", str(out)]
    first = run_train(*common, "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr and "on the validation subset" in first.stdout
    assert json.loads((out / "result.json").read_text())["steps"] == 4

    line = user_error(capsys, *common, "--set", "train.max_steps=4")  # would overwrite it
    assert "train.out_dir" in line and "--resume" in line

    longer = run_train(*common, "--set", "train.max_steps=6", "--resume", "--set",
                       "eval.test=true")
    assert longer.returncode == 0, longer.stderr
    assert "on the test split" in longer.stdout  # the last line gives both BLEU-4 scores
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]

    for ckpt in out.glob("ckpt_*.pt"):  # tamper with every checkpoint
        ckpt.write_bytes(ckpt.read_bytes()[:-1] + b"x")
    assert "SHA-256" in user_error(capsys, *common, "--resume")

    monkeypatch.setenv("AMT_INJECT_OOM", "1:99")
    line = user_error(capsys, *common, "--out-dir", str(tmp_path / "oom"))
    assert "out of memory" in line


def test_a_stored_config_with_a_retired_key_still_loads(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """Studies and checkpoints keep whole configs: one an earlier version wrote, with a key
    since removed (``trainer.config.RETIRED_KEYS``), loads with a warning naming the key."""
    import trainer.config
    from trainer.config import TrainConfig, config_from_dict, config_to_dict

    trainer.config._warned.clear()
    stored = config_to_dict(TrainConfig())
    stored["train"]["fused_norm_draws"] = False
    with caplog.at_level("WARNING", logger="trainer.config"):
        assert config_from_dict(stored) == TrainConfig()
        assert config_from_dict(stored) == TrainConfig()
    assert caplog.text.count("train.fused_norm_draws is no longer an option") == 1


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(task: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    common = [*TINY, "--set", f"data.path={task}", "--set", f"data.cache_dir={tmp_path}/cache",
              "--out-dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "run_train.py", *common, "--set", "train.max_steps=100000"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "AMT_PROGRESS": "0"})
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"  # made empty before the first step, then one line an eval
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)  # training has started: its first evaluation is written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("amt-train: stopped by SIGTERM after step ") and "--resume" in last
    step = int(last.split("after step ")[1].split(";")[0])
    resumed = run_train(*common, "--set", f"train.max_steps={step + 2}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out}/ckpt_{step:09d}.pt" in resumed.stderr
