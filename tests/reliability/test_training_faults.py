"""Faults inside training: a non-finite loss, CUDA out-of-memory (injected on CPU through the
trainer's ``AMT_INJECT_OOM`` hook) and a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

import trainer
from search.config import load_search_config, trial_train_config
from storage.checkpoints import latest_checkpoint, load_checkpoint, verify
from storage.errors import CheckpointError
from tests.reliability.conftest import (
    ForkServer,
    TinyStudy,
    Worker,
    make_study,
    resumed_steps,
    wait_for,
)
from trainer.config import config_from_dict


def test_nan_and_oom_fail_or_recover_and_the_worker_goes_on(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    record: Callable[..., None], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker, every trial's step 3 runs out of memory twice (512 -> 256 -> 128-token
    micro-batches): trial 0 diverges (LR 1e30), trial 1 may not go below 256 tokens, trial 2
    may go down to 128 and completes with 4 micro-batches per batch."""
    started = time.monotonic()
    lr, floor = "optim.lr", "train.min_micro_batch_tokens"
    study = make_study(
        tmp_path, corpus_dir, new_database(), "faults", n_trials=3,
        truncation={"max_steps": 16, "eval_every": 4, "eval_subset": 8, "warmup": 0.1},
        space={lr: {"type": "float", "low": 1e-3, "high": 1e30, "log": True},
               floor: {"type": "categorical", "choices": [128, 256]}},
        enqueue=[{lr: 1e30, floor: 128}, {lr: 3e-3, floor: 256}, {lr: 3e-3, floor: 128}],
    )
    worker = study.spawn(forkserver, 0, AMT_INJECT_OOM="3:2")
    rc = worker.wait(120)
    trials = study.study().get_trials(deepcopy=False)
    nan, oom, recovered = trials[:3]
    result = json.loads((study.run_dir(2) / "result.json").read_text())
    monkeypatch.delenv("AMT_INJECT_OOM", raising=False)
    cfg = load_search_config(study.config)
    reference = trainer.fit(trial_train_config(cfg, recovered.params, out_dir=tmp_path / "ref"))
    seconds = time.monotonic() - started

    no_retry = len(trials) == 3 and not any("failed_trial" in t.system_attrs for t in trials)
    nan_ok = (nan.state == TrialState.FAIL and nan.user_attrs.get("fail_reason") == "nan_loss"
              and "non-finite" in nan.user_attrs.get("fail_message", "") and no_retry)
    oom_ok = (oom.state == TrialState.FAIL and oom.user_attrs.get("fail_reason") == "oom"
              and "256 tokens" in oom.user_attrs.get("fail_message", "") and no_retry)
    recovered_ok = (
        recovered.state == TrialState.COMPLETE and result["micro_batch_tokens"] == 128
        and recovered.user_attrs["tokens"] == reference.tokens  # same tokens per step
        and abs(recovered.user_attrs["val_loss"] - reference.val_loss) < 1e-3
    )
    goes_on = rc == 0  # one worker process ran all three
    print(f"NaN: {nan.user_attrs.get('fail_message')}; OOM: {oom.user_attrs.get('fail_message')}"
          f"; recovered: {recovered.user_attrs['tokens']} tokens, val loss "
          f"{recovered.user_attrs['val_loss']:.5f} (without OOM {reference.val_loss:.5f})")
    record("NaN / inf loss", 1, int(nan_ok and goes_on), seconds,
           "trial FAIL with fail_reason nan_loss and the message, not retried; the same worker "
           "runs the next trials")
    record("CUDA OOM at the smallest micro-batch", 1, int(oom_ok and goes_on), seconds,
           "trial FAIL with fail_reason oom, not retried; the same worker goes on")
    record("CUDA OOM, recoverable", 1, int(recovered_ok and goes_on), seconds,
           "micro-batch halved twice (512 -> 128 tokens, 4x accumulation), same tokens per step "
           "and val loss as without OOM; trial completes")
    assert goes_on, worker.tail()
    assert nan_ok, nan.user_attrs
    assert oom_ok, oom.user_attrs
    assert recovered_ok, (result, recovered.user_attrs, reference)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(filler: Path) -> None:
    """Write ``filler`` until the disk it is on has no byte left."""
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC


class _FillDisk:
    """``fit`` callback: after the first evaluation (and its checkpoint), fill the disk."""

    def __init__(self, filler: Path) -> None:
        self.filler = filler

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.filler.exists():
            _fill(self.filler)


def test_disk_full_while_checkpointing_through_fit(
    small_disk: Path, corpus_dir: Path, record: Callable[..., None]
) -> None:
    started = time.monotonic()
    raw = yaml.safe_load((corpus_dir / "train.yaml").read_text())
    raw["train"].update({"max_steps": 12, "eval_every": 4, "out_dir": str(small_disk / "run")})
    cfg = config_from_dict(raw)
    filler = small_disk / "filler"
    with pytest.raises(CheckpointError, match="No space left on device") as failed:
        trainer.fit(cfg, [_FillDisk(filler)])
    run = small_disk / "run"
    left = sorted(p.name for p in run.iterdir())
    checks = verify(run)
    first = latest_checkpoint(run)
    intact = (
        [c.step for c in checks] == [4] and all(c.ok for c in checks) and first is not None
        and load_checkpoint(first)["progress"]["step"] == 4
        and not [n for n in left if n.endswith(".tmp")]
    )
    filler.unlink()  # space again: the run resumes from the intact checkpoint
    resumed = trainer.fit(cfg, resume=True)
    record("disk full while checkpointing", 1, int(intact and resumed.steps == 12),
           time.monotonic() - started,
           "through trainer.fit on a full tmpfs: one-line CheckpointError, no temp file left, "
           "the previous checkpoint verifies and loads; the run resumes from it once space is "
           "back")
    assert "\n" not in str(failed.value)
    assert intact, (left, checks)
    assert resumed.steps == 12 and os.path.exists(resumed.checkpoint or "")


def test_amt_train_on_a_full_disk_is_one_line_and_leaves_no_half_file(
    small_disk: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk is full before the run writes anything: amt-train exits 2 with one line
    naming the file, and no empty config.yaml is left behind."""
    from trainer.cli import main

    raw = yaml.safe_load((corpus_dir / "train.yaml").read_text())
    raw["train"].update({"max_steps": 4, "eval_every": 4})
    config = corpus_dir / "full-disk.yaml"
    config.write_text(yaml.safe_dump(raw))
    (small_disk / "run").mkdir()
    _fill(small_disk / "filler")
    rc = main(["--config", str(config), "--out-dir", str(small_disk / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("amt-train: error: ") and "run/config.yaml" in err[0]
    assert "No space left on device: free disk space" in err[0]
    assert not (small_disk / "run" / "config.yaml").exists()


def _trial_on_small_disk(forkserver: ForkServer, corpus_dir: Path, url: str, tmp_path: Path,
                         small_disk: Path, name: str) -> tuple[TinyStudy, Path, Worker]:
    """A one-trial study whose run directories are on ``small_disk``, its worker started and
    past trial 0's first checkpoint: (study, trial 0's run directory, worker)."""
    study = make_study(tmp_path, corpus_dir, url, name, n_trials=1,
                       truncation={"max_steps": 400, "eval_every": 4, "eval_subset": 8,
                                   "warmup": 0.1})
    study = dataclasses.replace(study, home=small_disk)
    run = study.run_dir(0)
    worker = study.spawn(forkserver, 0)
    wait_for(lambda: (run / "manifest.json").exists() or worker.poll() is not None, 120,
             "trial 0's first checkpoint")
    return study, run, worker


def test_disk_full_in_a_trial_stops_the_worker_and_the_retry_resumes(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    small_disk: Path, record: Callable[..., None],
) -> None:
    """The workers' run directories on a 2 MB tmpfs that fills up after the trial's first
    checkpoint: the worker stops with one line (no traceback), the trial is FAIL 'disk_full'
    with a queued retry, its checkpoints verify; with space again a worker resumes it."""
    started = time.monotonic()
    study, run, worker = _trial_on_small_disk(forkserver, corpus_dir, new_database(),
                                              tmp_path, small_disk, "diskfull")
    filler = small_disk / "filler"
    _fill(filler)
    rc = worker.wait(120)
    text = worker.text()
    trials = study.study().get_trials(deepcopy=False)
    checks = verify(run)
    left = sorted(p.name for p in run.iterdir())
    stopped_ok = (
        rc == 2 and "Traceback" not in text
        and text.strip().splitlines()[-1].startswith("amt-search: error: trial 0: cannot write")
        and "No space left on device" in text.strip().splitlines()[-1]
        and trials[0].state == TrialState.FAIL
        and trials[0].user_attrs.get("fail_reason") == "disk_full"
        and len(trials) == 2 and trials[1].state == TrialState.WAITING
        and trials[1].system_attrs.get("failed_trial") == 0
        and checks and all(c.ok for c in checks) and not [n for n in left if n.endswith(".tmp")]
    )
    filler.unlink()  # space again: the retry resumes from the intact checkpoint
    again = study.spawn(forkserver, 1)
    rc2 = again.wait(120)
    trials = study.study().get_trials(deepcopy=False)
    resumed = resumed_steps([again.text()])
    resumed_ok = (rc2 == 0 and trials[1].state == TrialState.COMPLETE
                  and trials[1].user_attrs.get("resumed_from") == 0
                  and resumed.get(1, 0) >= 4 and trials[1].user_attrs["steps"] == 400)
    print(text.strip().splitlines()[-1], f"| resumed from step {resumed.get(1)}")
    record("disk full in a search trial", 1, int(stopped_ok and resumed_ok),
           time.monotonic() - started,
           "run directories on a full tmpfs: the worker exits 2 with one line naming the trial "
           "(no traceback); trial FAIL 'disk_full' + a queued retry; its checkpoints verify, no "
           "temp file; with space again a new worker resumes it from its last checkpoint and "
           "completes it")
    assert stopped_ok, (rc, text[-3000:], [(t.state, t.user_attrs) for t in trials], checks,
                        left)
    assert resumed_ok, (rc2, again.tail(), resumed)


def test_read_only_disk_in_a_trial_stops_the_worker_and_the_retry_resumes(
    forkserver: ForkServer, corpus_dir: Path, new_database: Callable[[], str], tmp_path: Path,
    small_disk: Path, record: Callable[..., None],
) -> None:
    """The run directories' file system turns read-only mid-trial (remount ro, as after I/O
    errors): like a full disk, the worker stops with one line, the trial waits in the queue;
    writable again, a worker resumes it. (Was: run_dir retries that failed for good.)"""
    started = time.monotonic()
    study, run, worker = _trial_on_small_disk(forkserver, corpus_dir, new_database(),
                                              tmp_path, small_disk, "rodisk")
    try:  # the kernel refuses (busy) while a file is open for writing: the worker's writes
        wait_for(lambda: subprocess.run(["mount", "-o", "remount,ro", str(small_disk)],
                                        capture_output=True).returncode == 0
                 or worker.poll() is not None, 60, "a read-only remount")
        rc = worker.wait(120)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        if worker.poll() is None:
            worker.signal(9)
            worker.wait(30)
    text = worker.text()
    trials = study.study().get_trials(deepcopy=False)
    last = text.strip().splitlines()[-1]
    stopped_ok = (
        rc == 2 and "Traceback" not in text and last.startswith("amt-search: error: trial 0:")
        and "Read-only file system" in last and "remount it writable" in last
        and trials[0].user_attrs.get("fail_reason") == "disk_full"
        and len(trials) == 2 and trials[1].state == TrialState.WAITING
    )
    again = study.spawn(forkserver, 1)
    rc2 = again.wait(120)
    trials = study.study().get_trials(deepcopy=False)
    resumed_ok = (rc2 == 0 and trials[1].state == TrialState.COMPLETE
                  and trials[1].user_attrs.get("resumed_from") == 0)
    print(last)
    record("read-only disk in a search trial", 1, int(stopped_ok and resumed_ok),
           time.monotonic() - started,
           "run directories' file system remounted read-only mid-trial: the worker exits 2 "
           "with one line (no traceback); trial FAIL 'disk_full' + a queued retry; writable "
           "again, a new worker resumes and completes it")
    assert stopped_ok, (rc, text[-3000:], [(t.state, t.user_attrs) for t in trials])
    assert resumed_ok, (rc2, again.tail())
