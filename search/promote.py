"""``amt-search promote``: trial N's parameters on the full-run recipe, as a TrainConfig YAML,
optionally trained right away with ``amt-train`` (``torchrun`` over several GPUs)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import TrialState

from search.config import full_run_dict
from search.errors import SearchError
from search.launch import die_with_parent
from search.study import changed_keys, load_study, pinned_corpus
from storage import mask_url, resolve_url
from storage.checkpoints import latest_checkpoint
from storage.files import atomic_write, starts_with
from storage.paths import state_dir
from trainer.config import apply_overrides, config_from_dict, config_to_dict

__all__ = ["promote", "train_command"]

log = logging.getLogger(__name__)


def promote(
    study_name: str,
    trial_number: int,
    storage_url: str | None = None,
    out: str | Path | None = None,
) -> Path:
    """Write the full-run config for trial ``trial_number`` (the study's own numbering) and
    return its path (default ``<study>-trial-<N>.yaml`` in the current directory).

    The config is the study's recipe (base config + overrides, no truncation) with the
    trial's parameters and their derived keys; ``meta`` records the study, the trial, its
    BLEU-4 and the storage (password masked); ``train.out_dir`` is
    ``<state dir>/runs/<study>/full-trial-<N>``.

    Raises:
        SearchError: unknown study, or the trial is not a complete trial of it (the message
            lists the complete ones).
    """
    url = resolve_url(storage_url)
    study, cfg = load_study(study_name, url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    valid = ", ".join(map(str, complete)) or "none yet"
    if trial_number not in trials:
        raise SearchError(
            f"trial {trial_number} is not in study '{study_name}' "
            f"({len(trials)} trials; complete: {valid})"
        )
    trial = trials[trial_number]
    if trial.state != TrialState.COMPLETE:
        raise SearchError(
            f"trial {trial_number} of study '{study_name}' is {trial.state.name}, not COMPLETE "
            f"(complete: {valid})"
        )
    _warn_if_not_searched(trial, cfg)
    out_dir = state_dir() / "runs" / study_name / f"full-trial-{trial_number}"
    meta = {
        "study": study_name,
        "trial": trial_number,
        "trial_bleu4": trial.value,
        "params": dict(trial.params),
        "storage": mask_url(url),
    }
    recipe = apply_overrides(
        full_run_dict(cfg, dict(trial.params)),
        # the full run is the measurement: BLEU-4 on the whole test split at its end
        {"name": f"{study_name}-trial-{trial_number}", "train.out_dir": str(out_dir),
         "eval.test": True},
    )
    # every key written out: the file keeps its meaning if a default changes later
    full = config_from_dict(recipe)
    _warn_if_corpus_changed(study, full.data)
    raw = config_to_dict(full)
    raw["meta"] = {**raw["meta"], **meta}
    path = Path(out) if out is not None else Path(f"{study_name}-trial-{trial_number}.yaml")
    header = (
        f"# Full run of trial {trial_number} of study {study_name} (BLEU-4 {trial.value:.2f} on "
        "the truncated budget).\n# Written by 'amt-search promote': the study's recipe + the "
        "trial's parameters, no truncation.\n"
    )
    if not path.name or path.is_dir():
        raise SearchError(f"--out {str(out)!r}: not a file name — give a .yaml file to write")
    if path.exists() and not path.is_file():
        raise SearchError(f"--out {path}: not a regular file (a device or a pipe?) — give a "
                          ".yaml file to write")
    if path.exists() and not starts_with(path, b"# Full run of trial"):
        raise SearchError(f"--out {path}: the file exists and was not written by "
                          "'amt-search promote' — remove it or give another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = header + yaml.safe_dump(raw, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()), mode=0o644)
    log.info("wrote %s (run directory %s)", path, out_dir)
    return path


def _warn_if_not_searched(trial: Any, cfg: Any) -> None:
    """A trial told from outside (the dashboard, Optuna's API) carries no run of its own and
    may hold values the space never allowed: it is promoted, with a warning saying so."""
    space = {p.name: p for p in cfg.space}
    outside = [f"{k}={v!r}" for k, v in trial.params.items()
               if k not in space or not space[k].contains(v)]
    if "run_dir" not in trial.user_attrs:
        log.warning("trial %d was not run by an amt-search worker (no run directory recorded; "
                    "told from outside?): its BLEU-4 %.2f is not a measurement of this study's",
                    trial.number, trial.value)
    if outside:
        log.warning("trial %d has values outside the study's space: %s", trial.number,
                    ", ".join(outside))


def _warn_if_corpus_changed(study: Any, data: Any) -> None:
    """The study's pinned corpus files hold other pairs now: the full run would train and
    score on data its trials never saw (promoted all the same, with a warning)."""
    from trainer.data.corpus import corpus_change
    from trainer.errors import ConfigError

    pinned = pinned_corpus(study)
    if not pinned:
        return
    try:
        changed = corpus_change(data, pinned)
    except ConfigError as e:
        log.warning("%s: the full run cannot read it", e)
        return
    if changed:
        log.warning("%s: the file changed since create-study: the full run trains and scores on "
                    "other sentence pairs than the trials did", changed)


def train_command(config: Path, gpus: list[int]) -> tuple[list[str], dict[str, str]]:
    """``amt-train --config FILE`` (``--resume`` when its run directory holds a checkpoint),
    under ``torchrun --nproc-per-node N`` for N > 1 GPUs; and its environment."""
    out_dir = Path(yaml.safe_load(config.read_text())["train"]["out_dir"])
    args = ["-m", "trainer.cli", "--config", str(config)]
    if out_dir.exists() and latest_checkpoint(out_dir) is not None:
        _check_same_run(config, out_dir)
        args.append("--resume")
    if len(gpus) > 1:
        runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(gpus)}"]
        cmd = [sys.executable, *runner, *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
    return cmd, env


def _check_same_run(config: Path, out_dir: Path) -> None:
    """A checkpoint in ``out_dir`` is resumed only when it was trained with ``config``'s
    settings: one left by a run with others (``--set train.max_steps=...``) would continue
    under another schedule and mix two runs in one metrics.jsonl."""
    try:
        ran = yaml.safe_load((out_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # amt-train --resume checks what it can (corpus, model, optimiser)
    wanted = config_to_dict(config_from_dict(yaml.safe_load(config.read_text())))
    changed = changed_keys(ran, wanted, ignore=("meta",))
    if changed:
        raise SearchError(
            f"{out_dir} holds a checkpoint of a run with other settings ({', '.join(changed[:4])}"
            f"{', ...' if len(changed) > 4 else ''} differ): continue that run with amt-train "
            f"--config {out_dir / 'config.yaml'} --resume, or move the directory away to train "
            "the promoted config afresh")


def run_training(config: Path, gpus: list[int]) -> int:
    """Train ``config`` in a child process; SIGTERM / SIGHUP / SIGINT sent to this one reach
    it too (amt-train then saves and stops), so it is never left running on its own."""
    cmd, env = train_command(config, gpus)
    where = f"GPUs {','.join(map(str, gpus))}" if gpus else "CPU"
    log.info("training on %s: %s", where, " ".join(cmd))
    # its own session: a terminal's Ctrl-C reaches it once, through this process (twice would
    # be amt-train's "stop now"); SIGTERM (it saves) if this process dies, so that no orphan
    # trains on into the run directory that a second promote --run would resume
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    signals = [sig for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
               if signal.getsignal(sig) is not signal.SIG_IGN]  # nohup stays nohup
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    try:
        for sig in signals:
            signal.signal(sig, forward)
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
