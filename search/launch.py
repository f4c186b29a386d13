"""``amt-search launch``: one worker subprocess per GPU (or K CPU workers), watched.

The launcher never initialises CUDA itself: GPUs are listed by ``nvidia-smi`` (or
``torch.cuda.device_count()`` in a subprocess), and each worker pins its own through
``CUDA_VISIBLE_DEVICES``. Every few seconds it prints one progress line from the storage.
Ctrl-C or SIGTERM: SIGTERM to every worker (each saves its trial and re-enqueues it), wait,
exit; a second Ctrl-C kills them. Workers run in their own session so a terminal's Ctrl-C
reaches them only through the launcher, and (Linux) get SIGTERM if the launcher dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

import optuna

from search.errors import SearchError
from search.leaderboard import best_trial
from search.study import count_trials, load_study, next_action
from storage import resolve_url

__all__ = ["detect_gpus", "launch", "parse_gpus"]

log = logging.getLogger(__name__)


def detect_gpus() -> list[int]:
    """GPU indices visible to this process, without initialising CUDA here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(i) for i in visible.split(",") if i.strip().isdigit()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0:
            return [int(line) for line in out.stdout.split() if line.strip().isdigit()]
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        check=False,
    )
    n = int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0
    return list(range(n))


def parse_gpus(spec: str) -> list[int]:
    """``all`` (every GPU found) or a comma list such as ``0,1``."""
    if spec == "all":
        gpus = detect_gpus()
        if not gpus:
            raise SearchError("--gpus all: no GPU found (nvidia-smi, torch) — use --cpu-workers K")
        return gpus
    try:
        gpus = [int(i) for i in spec.split(",")]
    except ValueError:
        raise SearchError(f"--gpus {spec!r}: expected 'all' or indices like 0,1") from None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise SearchError(f"--gpus {spec!r}: indices must be distinct and >= 0")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    if any(v and not v.isdigit() for v in visible):
        return gpus  # GPU UUIDs or MIG ids: indices cannot be checked against them
    found = detect_gpus()
    missing = [g for g in gpus if g not in found]
    if missing:
        raise SearchError(
            f"--gpus {spec!r}: no GPU {', '.join(map(str, missing))} on this host (found: "
            f"{', '.join(map(str, found)) or 'none'}) — see nvidia-smi -L"
            + ("" if found else
               ", or run on the CPU (launch --cpu-workers K, promote --gpus cpu)"))
    return gpus


@dataclass
class _Worker:
    name: str
    proc: subprocess.Popen[bytes]


MAX_WORKERS_PER_CORE = 4


def launch(
    study_name: str,
    *,
    gpus: list[int] | None = None,
    cpu_workers: int = 0,
    storage_url: str | None = None,
    n_trials_per_worker: int | None = None,
    progress_every_s: float = 10.0,
) -> int:
    """Start the workers, print progress until they all exit. Returns 0 when every worker
    exited 0, else 1.

    Raises:
        SearchError: no such study, or neither GPUs nor CPU workers asked for.
    """
    if not gpus and cpu_workers <= 0:
        raise SearchError("nothing to launch: give --gpus all|0,1,... or --cpu-workers K")
    cores = os.cpu_count() or 1
    if cpu_workers > MAX_WORKERS_PER_CORE * cores:
        raise SearchError(f"--cpu-workers {cpu_workers}: more than {MAX_WORKERS_PER_CORE} per "
                          f"CPU core ({cores} here); each worker trains a model of its own")
    url = resolve_url(storage_url)  # one server for all (starts the embedded one once)
    study, cfg = load_study(study_name, url)
    if next_action(study, cfg) == "done":  # what each worker would find: start none
        finished = count_trials(study.get_trials(deepcopy=False)).finished
        budget = f"/{cfg.n_trials}" if cfg.n_trials is not None else " (timeout_s passed)"
        print(f"[launch] study {study_name} is done: {finished}{budget} trials finished — see "
              f"amt-search status --study {study_name}", flush=True)
        return 0
    base = [sys.executable, "-m", "search.cli", "worker", "--study", study_name, "--storage", url]
    if n_trials_per_worker is not None:
        base += ["--n-trials", str(n_trials_per_worker)]
    # each worker gets its share of the cores for its CPU thread pools (unless the user set
    # them): N processes with a pool of every core each oversubscribe the host, and a GPU
    # worker's kernel launches then wait for CPU time
    threads = str(max(1, (os.cpu_count() or 1) // max(len(gpus or []) + cpu_workers, 1)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ}
    specs: list[tuple[str, list[str], dict[str, str]]] = []
    for gpu in gpus or []:
        specs.append((f"gpu{gpu}", [*base, "--gpu", str(gpu)], env))
    for k in range(cpu_workers):
        specs.append((f"cpu{k}", [*base, "--cpu", "--worker-index", str(k)], env))
    workers = [
        _Worker(
            name, subprocess.Popen(cmd, env=e, start_new_session=True, preexec_fn=die_with_parent)
        )
        for name, cmd, e in specs
    ]
    log.info(
        "launched %d workers (%s) on study %s",
        len(workers),
        ", ".join(w.name for w in workers),
        study_name,
    )

    signals = {"count": 0}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        sig = signal.SIGTERM if signals["count"] == 1 else signal.SIGKILL
        log.info("%s: sending %s to the workers", signal.Signals(signum).name, sig.name)
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        last_line, last_print = "", 0.0
        while any(w.proc.poll() is None for w in workers):
            time.sleep(0.5)
            now = time.monotonic()
            if now - last_print >= progress_every_s:
                line = _safe_progress_line(study, cfg.n_trials, workers)
                if line != last_line or now - last_print >= 6 * progress_every_s:
                    print(line, flush=True)
                    last_line, last_print = line, now
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    print(_safe_progress_line(study, cfg.n_trials, workers), flush=True)
    failed = [w for w in workers if w.proc.returncode != 0]
    for w in failed:
        log.error("worker %s exited with status %s", w.name, w.proc.returncode)
    if signals["count"]:  # stopped, not finished: scripts must be able to tell
        where = (f"--gpus {','.join(map(str, gpus))}" if gpus
                 else f"--cpu-workers {cpu_workers}")
        log.info("stopped: the running trials saved and wait to resume — continue with "
                 "'amt-search launch --study %s %s'", study_name, where)
        return 130
    return 1 if failed else 0


def _safe_progress_line(study: optuna.Study, n_trials: int | None,
                        workers: list[_Worker]) -> str:
    """The progress line; when the study was deleted under launch (delete-study --force), a
    line saying so: the workers end on their own at their next eval."""
    try:
        return _progress_line(study, n_trials, workers)
    except KeyError as e:
        if "Record does not exist" not in str(e):
            raise
        alive = sum(w.proc.poll() is None for w in workers)
        return (f"[launch] study {study.study_name} was deleted: {alive}/{len(workers)} "
                "workers alive, each stops at its next eval")


def _progress_line(study: optuna.Study, n_trials: int | None, workers: list[_Worker]) -> str:
    c = count_trials(study.get_trials(deepcopy=False))
    best = best_trial(study)
    budget = f"/{n_trials}" if n_trials else ""
    alive = sum(w.proc.poll() is None for w in workers)
    best_text = f"best BLEU-4 {best.value:.2f} (trial {best.number})" if best else "no best yet"
    return (
        f"[launch] {c.finished}{budget} finished: {c.complete} complete, {c.pruned} pruned, "
        f"{c.failed} failed; {c.running} running, {c.waiting} waiting; {best_text}; "
        f"{alive}/{len(workers)} workers alive"
    )


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux prctl)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
