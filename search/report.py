"""``amt-search report``: Report 03's figures and summary, drawn from the live study.

Writes into ``--out DIR``:

* ``optuna_parallel.png``: parallel coordinates of the complete trials, coloured by BLEU-4
  (the report's ``assets/optuna_parallel.png``);
* ``train_val_loss.png``: train (solid) and val (dashed) loss per eval of chosen trials and of
  the promoted full run(s) (the report's ``assets/train_val_loss.png``);
* ``param_importance.png``: hyper-parameter importance by PED-ANOVA
  (:class:`optuna.importance.PedAnovaImportanceEvaluator`, the only Optuna evaluator that
  needs neither scikit-learn nor anything else we do not install);
* ``intermediate_bleu.png``: BLEU-4 at each eval of every trial, pruned trials marked;
* ``REPORT.md``: counts, the top-trials table (Report 03 §4), compute spent and saved by
  pruning, the best trial and how to promote it, the figures.

A figure without data (no complete trial yet, no loss curve ...) is not drawn; REPORT.md says
what is missing instead, and a stale PNG of that name is removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from search.config import SearchConfig, trial_train_config
from search.errors import SearchError
from search.leaderboard import best_trial, trial_row
from search.study import count_trials, load_study
from storage import mask_url, resolve_url
from storage.paths import state_dir
from trainer.errors import ConfigError

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: every other amt-search
    import matplotlib  # command starts ~0.35 s faster without it
    from matplotlib.figure import Figure

__all__ = [
    "Curve",
    "NothingToPlot",
    "importance_figure",
    "intermediate_figure",
    "loss_figure",
    "parallel_figure",
    "pruning_savings",
    "register",
    "write_report",
]

log = logging.getLogger(__name__)

PARAM_LABELS = {"model.n_layers": "layers", "model.d_model": "hidden", "optim.lr": "LR"}
TOP_TRIALS = 5  # rows of the top-trials table
DEFAULT_LOSS_TRIALS = 3  # complete trials in train_val_loss.png unless --trials says otherwise
STATE_WORDS = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
}
MARKERS = "osD^vP*X"  # with the colours, so that overlapping loss curves stay apart


class NothingToPlot(Exception):
    """A figure has no data; the message says what is missing."""


@dataclass(frozen=True)
class Curve:
    """One run's loss per eval: a trial (truncated budget) or a full run."""

    label: str
    steps: list[float]
    train_loss: list[float]
    val_loss: list[float]
    full_run: bool = False


# ---------------------------------------------------------------------------------------------
# the report


def write_report(
    study_name: str | None,
    out_dir: str | Path,
    storage_url: str | None = None,
    trials: Sequence[int] | None = None,
    runs: Sequence[str | Path] = (),
) -> Path:
    """Draw the figures and write ``REPORT.md`` into ``out_dir``; returns REPORT.md's path.

    ``trials``: the trials whose loss curves are drawn (default: the best
    ``DEFAULT_LOSS_TRIALS`` complete ones). ``runs``: full-run directories (holding
    ``metrics.jsonl``); by default the promoted runs of this study found under
    ``<state dir>/runs/<study>/full-trial-*``.

    Raises:
        SearchError: unknown study (the message lists the existing ones), a trial number
            not in the study, or a run directory that does not exist.
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise SearchError(f"--out {out_dir}: a file, not a directory — give a directory for "
                          "REPORT.md and the figures")
    url = resolve_url(storage_url)
    study, cfg = load_study(study_name, url)  # None: the storage's only study
    study_name = study.study_name
    all_trials = study.get_trials(deepcopy=False)
    log.info("study %s (%s): %d trials", study_name, mask_url(url), len(all_trials))
    run_dirs = [Path(r) for r in runs] or promoted_run_dirs(study_name, all_trials)
    curves, missing_curves = collect_curves(all_trials, trials, run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, tuple[str, Callable[[], Figure]]] = {
        "optuna_parallel.png": ("Parallel coordinates", lambda: parallel_figure(study, cfg)),
        "train_val_loss.png": ("Train / val loss", lambda: loss_figure(curves, study_name)),
        "param_importance.png": ("Hyper-parameter importance", lambda: importance_figure(study)),
        "intermediate_bleu.png": (
            "Intermediate BLEU-4",
            lambda: intermediate_figure(all_trials, cfg, study_name),
        ),
    }
    not_drawn: dict[str, str] = {}
    for name, (_, make) in figures.items():
        path = out / name
        log.info("drawing %s", name)
        try:
            fig = make()
        except NothingToPlot as e:
            path.unlink(missing_ok=True)
            not_drawn[name] = str(e)
            log.warning("%s not drawn: %s", name, e)
            continue
        fig.savefig(path, dpi=110, bbox_inches="tight")
        log.info("wrote %s", path)

    text = summary_markdown(
        study,
        cfg,
        mask_url(url),
        {name: title for name, (title, _) in figures.items()},
        not_drawn,
        missing_curves,
    ) + full_runs_markdown(run_dirs)
    report = out / "REPORT.md"
    report.write_text(text)
    log.info("wrote %s", report)
    return report


def summary_markdown(
    study: optuna.Study,
    cfg: SearchConfig,
    storage: str,
    figures: dict[str, str],
    not_drawn: dict[str, str],
    missing_curves: list[str],
) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    unit, key = compute_unit(trials)
    spent = sum(float(t.user_attrs.get(key) or 0.0) for t in trials)
    saved, n_untimed = pruning_savings(trials, cfg.pruner_max_resource, key)
    best = best_trial(study)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Search report: study `{study.study_name}`",
        "",
        f"- storage: `{storage}`",
        f"- generated: {when}",
        f"- trials: {counts.total} ({counts.complete} complete, {counts.pruned} pruned, "
        f"{counts.failed} failed, {counts.running} running, {counts.waiting} waiting; "
        f"a retried trial counts once{_superseded(len(trials) - counts.total)})",
    ]
    from trainer.data.corpus import describe_corpus  # (imports torch: not at start-up)

    try:
        lines.append(f"- corpus: {describe_corpus(trial_train_config(cfg, {}, out_dir='.').data)}")
    except ConfigError:
        pass
    signatures = sorted({str(t.user_attrs["bleu_signature"]) for t in trials
                         if t.user_attrs.get("bleu_signature")})
    if signatures:
        lines.append(f"- BLEU-4: sacrebleu {' / '.join(f'`{s}`' for s in signatures)}")
    if unit == "CPU":
        lines.append(
            "- GPU-seconds spent: none recorded (the trials ran on the CPU; CPU-seconds below)"
        )
    lines += [
        f"- {unit}-seconds spent: {spent:.0f} (sum of the trials' `{key}`, every attempt)",
        f"- {unit}-seconds saved by pruning: about {saved:.0f} — for each pruned trial, "
        f"(max_resource − its last eval) × its {unit}-seconds per eval, where max_resource = "
        f"{cfg.pruner_max_resource} evals and {unit}-seconds per eval = its `{key}` / its last "
        "eval",
    ]
    if n_untimed:
        lines.append(f"  ({n_untimed} pruned trial(s) have no `{key}` and are left out)")
    timed = [t for t in trials if t.user_attrs.get("eval_seconds") is not None
             and t.user_attrs.get("wall_seconds")]
    if timed:
        evals = sum(float(t.user_attrs["eval_seconds"]) for t in timed)
        wall = sum(float(t.user_attrs["wall_seconds"]) for t in timed)
        lines.append(f"- evaluation (val loss + decoding for BLEU-4): {evals:.0f} of the "
                     f"{wall:.0f} wall-seconds of {len(timed)} trials ({evals / wall:.0%})")
    if best is None:
        lines.append("- best trial: none yet (no complete trial)")
    else:
        lines += [
            f"- best trial: {best.number}, BLEU-4 {best.value:.2f}",
            f"- promote it: `amt-search promote --study {study.study_name} --trial "
            f"{best.number} --run` (with this report's --storage / $AMT_STORAGE_URL)",
        ]
    lines += ["", "## Top trials", "", top_table(study, cfg), "", "## Figures", ""]
    for name, title in figures.items():
        lines += [f"### {title}", ""]
        if name in not_drawn:
            lines.append(f"*Not drawn: {not_drawn[name]}.*")
        else:
            lines.append(f"![{title}]({name})")
        if name == "train_val_loss.png" and missing_curves:
            lines += ["", "Missing loss curves:", "", *(f"- {m}" for m in missing_curves)]
        lines.append("")
    return "\n".join(lines)


def _superseded(n: int) -> str:
    return "" if n == 0 else f": {n} earlier attempt{'s' * (n != 1)} that a retry replaced"


def full_runs_markdown(run_dirs: Sequence[Path]) -> str:
    """A section per full run: where, how far, why it stopped, its BLEU-4 (``result.json`` of a
    finished run; the last eval of ``metrics.jsonl`` while it runs or after it was stopped)."""
    lines = []
    for d in run_dirs:
        try:
            result = json.loads((d / "result.json").read_text())
        except (OSError, ValueError):
            result = None
        if isinstance(result, dict) and all(
                _number(result.get(k)) for k in ("bleu", "val_loss")) and (
                result.get("test_bleu") is None or _number(result["test_bleu"])):
            test = result.get("test_bleu")
            lines.append(
                f"- `{d}`: {result.get('steps')} steps, stopped by {result.get('stopped_by')}; "
                f"BLEU-4 {float(result['bleu']):.2f} on the validation subset, "
                + (f"**{float(test):.2f} on the test split**" if test is not None
                   else "no test-split BLEU-4 (eval.test off)")
                + f"; val loss {float(result['val_loss']):.4f}")
            continue
        evals = [m for m in _jsonl_rows(d / "metrics.jsonl") if "bleu" in m]
        if evals:
            last = evals[-1]
            lines.append(f"- `{d}`: not finished (running or stopped; `amt-train --resume` "
                         f"continues it): last eval at step {last.get('step')}, BLEU-4 "
                         f"{float(last['bleu']):.2f} on the validation subset")
        else:
            lines.append(f"- `{d}`: no evaluation yet")
    return "\n".join(["", "## Full runs", "", *lines, ""]) if lines else ""


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (``metrics.jsonl``); none when it cannot be read; a
    line cut short by a kill mid-write is skipped."""
    try:  # a damaged byte spoils its line only
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            m = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(m, dict) and all(_number(m[k]) for k in _NUMERIC if k in m):
            rows.append(m)
    return rows


_NUMERIC = ("step", "train_loss", "val_loss", "bleu", "lr")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def top_table(study: optuna.Study, cfg: SearchConfig, top: int = TOP_TRIALS) -> str:
    """Report 03 §4's table (trial, layers, hidden, LR, BLEU-4) of the best complete trials,
    the best BLEU-4 in bold."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "*No complete trial yet.*"
    ranked = sorted(complete, key=lambda t: (-float(t.value or 0.0), t.number))[:top]
    lines = [
        "| Trial | Layers | Hidden | LR | BLEU-4 |",
        "|-------|--------|--------|----|--------|",
    ]
    for i, t in enumerate(ranked):
        r = trial_row(cfg, t)
        lr = f"{r['lr']:.1e}" if isinstance(r["lr"], float) else _cell(r["lr"])
        bleu = f"{r['bleu4']:.2f}"
        lines.append(
            f"| {r['trial']} | {_cell(r['layers'])} | {_cell(r['hidden'])} | {lr} | "
            f"{f'**{bleu}**' if i == 0 else bleu} |"
        )
    return "\n".join(lines)


def compute_unit(trials: Sequence[FrozenTrial]) -> tuple[str, str]:
    """("CPU", "cpu_seconds") when the trials ran on the CPU only (none has ``gpu_seconds``,
    some have ``cpu_seconds``), else ("GPU", "gpu_seconds")."""
    gpu = any(t.user_attrs.get("gpu_seconds") for t in trials)
    if not gpu and any(t.user_attrs.get("cpu_seconds") for t in trials):
        return "CPU", "cpu_seconds"
    return "GPU", "gpu_seconds"


def pruning_savings(
    trials: Sequence[FrozenTrial], max_resource: int, key: str = "gpu_seconds"
) -> tuple[float, int]:
    """Seconds pruning saved, estimated: for each pruned trial with ``key`` in its user attrs,
    (``max_resource`` − its last eval k) × ``key`` / k, i.e. the evals it did not run at the
    rate it ran its own. Returns (seconds, number of pruned trials without ``key``)."""
    saved, untimed = 0.0, 0
    for t in trials:
        if t.state != TrialState.PRUNED or not t.intermediate_values:
            continue
        seconds = t.user_attrs.get(key)
        if seconds is None:
            untimed += 1
            continue
        last = max(t.intermediate_values)
        if last > 0:
            saved += max(max_resource - last, 0) * float(seconds) / last
    return saved, untimed


# ---------------------------------------------------------------------------------------------
# loss curves: which, and where they come from


def promoted_run_dirs(study_name: str, trials: Sequence[FrozenTrial] | None = None
                      ) -> list[Path]:
    """Full runs promoted from this study: ``<state dir>/runs/<study>/full-trial-*`` whose
    ``config.yaml`` has ``meta.study`` = ``study_name`` and, given the study's ``trials``,
    ``meta.params`` = trial ``meta.trial``'s (not a run of a deleted study of that name)."""
    by_number = {t.number: t for t in trials or ()}
    found = []
    for d in sorted((state_dir() / "runs" / study_name).glob("full-trial-*")):
        meta = _run_meta(d)
        if meta.get("study") != study_name:
            continue
        trial = by_number.get(meta.get("trial"))  # type: ignore[arg-type]
        if trials is not None and (trial is None
                                   or "params" in meta and meta["params"] != trial.params):
            log.info("skipping %s: promoted from another study named %s (deleted and "
                     "created again?)", d, study_name)
            continue
        found.append(d)
    return found


def collect_curves(
    trials: Sequence[FrozenTrial], chosen: Sequence[int] | None, run_dirs: Sequence[Path]
) -> tuple[list[Curve], list[str]]:
    """The loss curves to draw and, for each chosen trial or run without one, why."""
    by_number = {t.number: t for t in trials}
    if chosen is None:
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        complete.sort(key=lambda t: (-float(t.value or 0.0), t.number))
        picked = complete[:DEFAULT_LOSS_TRIALS]
    else:
        unknown = [n for n in chosen if n not in by_number]
        if unknown:
            known = ", ".join(map(str, sorted(by_number))) or "none"
            raise SearchError(
                f"--trials: {', '.join(map(str, unknown))} not in the study (trials: {known})"
            )
        picked = [by_number[n] for n in chosen]
    curves: list[Curve] = []
    missing: list[str] = []
    for t in picked:
        curve = trial_curve(t)
        if curve is None:
            missing.append(
                f"trial {t.number}: no `curve` user attribute and no metrics.jsonl in its run "
                f"directory ({t.user_attrs.get('run_dir', 'not recorded')})"
            )
        else:
            curves.append(curve)
    for d in run_dirs:
        if not d.is_dir():
            what = "a file, not a directory" if d.exists() else "no such directory"
            raise SearchError(f"--run {d}: {what} — pass a full run's train.out_dir (the "
                              "directory with metrics.jsonl)")
        if d.name.startswith("trial-"):
            log.warning("--run %s is a search trial's run directory (truncated budget), not a "
                        "full run's (full-trial-N)", d)
        curve = run_curve(d)
        if curve is None:
            missing.append(f"run {d}: no evals with train and val loss in metrics.jsonl yet")
        else:
            curves.append(curve)
    return curves, missing


def trial_curve(t: FrozenTrial) -> Curve | None:
    """From the trial's ``curve`` user attribute, else its run directory's metrics.jsonl."""
    label = f"trial {t.number} " + (
        f"(BLEU-4 {t.value:.2f})"
        if t.state == TrialState.COMPLETE
        else f"({STATE_WORDS.get(t.state, t.state.name.lower())})"
    )
    c = t.user_attrs.get("curve")
    if isinstance(c, dict) and c.get("step") and c.get("train_loss") and c.get("val_loss"):
        return Curve(label, list(c["step"]), list(c["train_loss"]), list(c["val_loss"]))
    run_dir = t.user_attrs.get("run_dir")
    return _jsonl_curve(Path(run_dir) / "metrics.jsonl", label) if run_dir else None


def run_curve(run_dir: Path) -> Curve | None:
    meta = _run_meta(run_dir)
    if "trial" in meta:
        label = f"full run of trial {meta['trial']}"
    else:
        label = f"full run {run_dir.name}"
    return _jsonl_curve(run_dir / "metrics.jsonl", label, full_run=True)


def _jsonl_curve(path: Path, label: str, full_run: bool = False) -> Curve | None:
    rows = [m for m in _jsonl_rows(path) if {"step", "train_loss", "val_loss"} <= m.keys()]
    if not rows:
        return None
    return Curve(
        label,
        [float(m["step"]) for m in rows],
        [float(m["train_loss"]) for m in rows],
        [float(m["val_loss"]) for m in rows],
        full_run,
    )


def _run_meta(run_dir: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    meta = raw.get("meta") if isinstance(raw, dict) else None
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------
# figures (each returns a Figure or raises NothingToPlot)


def parallel_figure(study: optuna.Study, cfg: SearchConfig | None = None) -> Figure:
    """One vertical axis per hyper-parameter (searched order, layers/hidden/LR first) and
    BLEU-4 last; one line per complete trial coloured by BLEU-4, the best one in red.
    Log-scale parameters are on a log axis; a trial without a parameter (a different search
    space) crosses that axis at "n/a" below it."""
    from matplotlib.figure import Figure

    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not trials:
        raise NothingToPlot("no complete trial yet")
    names = _param_order(trials, cfg)
    if not names:
        raise NothingToPlot("the complete trials have no parameters")
    dists = {n: next(t.distributions[n] for t in trials if n in t.distributions) for n in names}
    bleu = [float(t.value or 0.0) for t in trials]  # all finite: filtered above
    axes_values: list[list[float | None]] = []
    ticks: list[list[tuple[float, str]]] = []
    for n in names:
        pos, tk = _scale([t.params.get(n) for t in trials], dists[n])
        axes_values.append(pos)
        ticks.append(tk)
    pos, tk = _scale(bleu, FloatDistribution(min(bleu), max(bleu)))
    axes_values.append(pos)
    ticks.append(tk)
    labels = [PARAM_LABELS.get(n, n) for n in names] + ["BLEU-4"]
    missing = [any(v is None for v in values) for values in axes_values]
    na = -0.12  # where a trial without the parameter crosses its axis

    fig = Figure(figsize=(max(8.0, 1.25 * len(labels) + 2), 5.5), layout="constrained")
    ax = fig.add_subplot()
    colour, scale = _bleu_colours(bleu)
    best = max(range(len(trials)), key=lambda i: (bleu[i], -trials[i].number))
    xs = list(range(len(labels)))
    for i in sorted(range(len(trials)), key=lambda i: bleu[i]):  # better ones on top
        ys = [na if (v := values[i]) is None else v for values in axes_values]
        if i == best:
            label = f"best: trial {trials[best].number} (BLEU-4 {bleu[best]:.2f})"
            ax.plot(xs, ys, color="crimson", lw=3, zorder=3, label=label)
        else:
            ax.plot(xs, ys, color=colour(bleu[i]), lw=1.4, alpha=0.85)
    for x, axis_ticks, has_missing in zip(xs, ticks, missing, strict=True):
        ax.axvline(x, color="black", lw=0.8)
        for y, text in axis_ticks + ([(na, "n/a")] if has_missing else []):
            ax.text(
                x + 0.04,
                y,
                text,
                fontsize=8,
                va="center",
                ha="left",
                zorder=4,
                bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 0.5},
            )
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(labels) - 0.4)
    ax.set_ylim(na - 0.06 if any(missing) else -0.06, 1.06)
    ax.set_xlabel(
        "hyper-parameter (each axis on its own scale, log-scale ones logarithmic"
        + ("; n/a: not in that trial's search space)" if any(missing) else ")")
    )
    ax.set_ylabel("value, low to high")
    ax.set_title(
        f"Study {study.study_name}: {_count(len(trials), 'complete trial')} by BLEU-4 "
        "(pruned and failed trials not shown)"
    )
    fig.legend(loc="outside lower left", fontsize=9)
    if scale is not None:
        fig.colorbar(scale, ax=ax, label="BLEU-4 (final, truncated budget)", pad=0.01)
    return fig


def _param_order(trials: Sequence[FrozenTrial], cfg: SearchConfig | None) -> list[str]:
    present = {n for t in trials for n in t.params}
    order = [n for n in PARAM_LABELS if n in present]
    if cfg is not None:
        order += [p.name for p in cfg.space if p.name in present and p.name not in order]
    return order + sorted(present - set(order))


def _scale(
    values: Sequence[Any], dist: optuna.distributions.BaseDistribution
) -> tuple[list[float | None], list[tuple[float, str]]]:
    """Positions in [0, 1] (None where missing) and (position, label) ticks for one axis."""
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        step = 1 / max(len(choices) - 1, 1)
        index = {repr(c): i for i, c in enumerate(choices)}
        pos = [None if v is None else index.get(repr(v), 0) * step for v in values]
        return pos, [
            (i * step if len(choices) > 1 else 0.5, str(c)) for i, c in enumerate(choices)
        ]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    log_scale = dist.log
    f: Callable[[float], float] = math.log10 if log_scale else float
    lo, hi = f(dist.low), f(dist.high)
    span = hi - lo

    def at(v: float) -> float:
        return (f(v) - lo) / span if span > 0 else 0.5

    pos = [None if v is None else at(float(v)) for v in values]
    if isinstance(dist, IntDistribution) and (dist.high - dist.low) / dist.step <= 8:
        tick_values = [float(v) for v in range(dist.low, dist.high + 1, dist.step)]
    else:
        tick_values = (
            [10 ** (lo + k * span / 4) if log_scale else lo + k * span / 4 for k in range(5)]
            if span > 0
            else [float(dist.low)]
        )
    return pos, [(at(v), _num(v, isinstance(dist, IntDistribution))) for v in tick_values]


def loss_figure(curves: Sequence[Curve], study_name: str = "") -> Figure:
    """Train (solid) and val (dashed) loss against the optimiser step, one colour per run;
    trials and full runs in separate panels (their step ranges differ by orders of
    magnitude), each full run's lowest val loss marked."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not curves:
        raise NothingToPlot("no trial or full run has a loss curve")
    groups = [
        (title, [c for c in curves if c.full_run == full])
        for title, full in (("trials (truncated budget)", False), ("full runs", True))
    ]
    groups = [(title, cs) for title, cs in groups if cs]
    fig = Figure(figsize=(6.5 * len(groups) + 1, 5), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    colours = matplotlib.colormaps["tab10"]
    k = 0
    for ax, (title, cs) in zip(axes, groups, strict=True):
        for c in cs:
            colour = colours(k % 10)
            k += 1
            marker = MARKERS[(k - 1) % len(MARKERS)] if len(c.steps) <= 30 else None
            label = c.label
            if c.full_run:  # the report's "val loss bottoms at 1.72 @ epoch 24"
                i = min(range(len(c.val_loss)), key=lambda j: c.val_loss[j])
                label += f" (min val loss {c.val_loss[i]:.3f} @ step {c.steps[i]:.0f}: ▼)"
                ax.plot(c.steps[i], c.val_loss[i], marker="v", ms=10, color=colour, ls="none")
            line = {"color": colour, "marker": marker, "ms": 4, "alpha": 0.85}
            ax.plot(c.steps, c.train_loss, ls="-", label=label, **line)
            ax.plot(c.steps, c.val_loss, ls="--", **line)
        style = [
            Line2D([], [], color="black", ls="-", label="train loss"),
            Line2D([], [], color="black", ls="--", label="val loss"),
        ]
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=[*handles, *style], fontsize=8)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("loss (per target token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Train / val loss per eval{f' — study {study_name}' if study_name else ''}")
    return fig


def importance_figure(study: optuna.Study) -> Figure:
    """PED-ANOVA importance of each parameter for reaching the top 10 % of BLEU-4 among the
    complete trials (needs at least 3 complete trials: the top 10 % are at least 2 trials
    and must be fewer than all of them)."""
    from matplotlib.figure import Figure

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) >= 3 and len({t.value for t in complete}) == 1:
        raise NothingToPlot(
            f"every complete trial scored BLEU-4 {complete[0].value:.2f}: nothing tells the "
            "parameters apart (a task the models have not learned yet?)")
    if len(complete) < 3:
        raise NothingToPlot(
            f"{len(complete)} complete trial(s); PED-ANOVA importance needs at least 3"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
    if not importances or not any(importances.values()):
        raise NothingToPlot(
            "PED-ANOVA found no parameter that separates the best trials from the rest"
        )
    names = list(importances)[::-1]  # most important on top
    values = [importances[n] for n in names]
    fig = Figure(figsize=(8, 1.0 + 0.45 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh([PARAM_LABELS.get(n, n) for n in names], values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("importance (PED-ANOVA, normalised to sum to 1)")
    ax.set_ylabel("hyper-parameter")
    ax.set_title(
        f"Study {study.study_name}: what matters for BLEU-4 ({len(complete)} complete trials)"
    )
    return fig


def intermediate_figure(
    trials: Sequence[FrozenTrial], cfg: SearchConfig, study_name: str = ""
) -> Figure:
    """BLEU-4 at each eval (the pruner's step) of every trial that reported one: complete
    trials coloured by their final BLEU-4 (the best five numbered), pruned trials grey with
    an × and their number where they were pruned, running ones dotted, failed ones dark red."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    reported = [t for t in trials if t.intermediate_values]
    if not reported:
        raise NothingToPlot("no trial has reported an intermediate BLEU-4 yet")
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    complete = sorted(
        (t for t in reported if t.state == TrialState.COMPLETE),
        key=lambda t: float(t.value or 0.0),
    )
    colour, scale = _bleu_colours([float(t.value or 0.0) for t in complete])
    styles: dict[TrialState, tuple[dict[str, Any], str]] = {  # line style, legend entry
        TrialState.PRUNED: (
            {"color": "grey", "lw": 1, "alpha": 0.8, "zorder": 3},
            "pruned (× where it was pruned)",
        ),
        TrialState.RUNNING: ({"color": "tab:blue", "lw": 1.2, "ls": ":", "zorder": 3}, "running"),
        TrialState.FAIL: ({"color": "darkred", "lw": 1.2, "ls": "-.", "zorder": 3}, "failed"),
    }
    legend: dict[str, Line2D] = {}
    for t in complete:
        steps, bleu = _series(t)
        ax.plot(steps, bleu, color=colour(float(t.value or 0.0)), lw=1.8, marker="o", ms=3)
    if complete:
        legend["complete"] = Line2D(
            [],
            [],
            color=colour(max(float(t.value or 0.0) for t in complete)),
            lw=1.8,
            marker="o",
            ms=3,
            label="complete (colour: final BLEU-4)" if scale else "complete",
        )
    for t in reported:
        if t.state not in styles:
            continue
        style, label = styles[t.state]
        steps, bleu = _series(t)
        ax.plot(steps, bleu, **style)
        if t.state == TrialState.PRUNED:
            ax.plot(
                steps[-1], bleu[-1], color="black", marker="x", ms=8, mew=2, ls="none", zorder=4
            )
            ax.annotate(f"#{t.number}", (steps[-1], bleu[-1]), xytext=(5, -3),
                        textcoords="offset points", fontsize=6, color="dimgrey")
        legend.setdefault(
            label,
            Line2D(
                [],
                [],
                marker="x" if t.state == TrialState.PRUNED else "",
                mec="black",
                label=label,
                **style,
            ),
        )
    _label_ends(ax, complete[::-1][:5])
    # below the axes: inside, it hid the curves' ends and their trial numbers
    ax.legend(handles=list(legend.values()), loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=len(legend), fontsize=8, frameon=False)
    if scale is not None:
        fig.colorbar(
            scale,
            ax=ax,
            label="final BLEU-4 (complete trials)",
            pad=0.01,
        )
    max_resource = cfg.pruner_max_resource
    ax.set_xlim(0.7, max_resource + 0.6)
    ax.set_xticks(range(1, max_resource + 1))
    ax.set_xlabel(
        f"eval k (every {cfg.truncation.eval_every} optimiser steps; "
        f"the pruner's resource, max {max_resource})"
    )
    ax.set_ylabel("BLEU-4 (sacrebleu, 0-100)")
    counts = ", ".join(
        f"{n} {word}"
        for state, word in STATE_WORDS.items()
        if (n := sum(t.state == state for t in reported))
    )
    ax.set_title(f"Intermediate BLEU-4{f' — study {study_name}' if study_name else ''}: {counts}")
    ax.grid(alpha=0.3)
    return fig


def _bleu_colours(
    values: Sequence[float],
) -> tuple[Callable[[float], Any], matplotlib.cm.ScalarMappable | None]:
    """Viridis over the BLEU-4 range, and the mappable for its colour bar; with fewer than
    two distinct values there is no range: one colour and no colour bar."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    if len(set(values)) < 2:
        return (lambda _: cmap(0.75)), None
    norm = matplotlib.colors.Normalize(min(values), max(values))
    return (lambda v: cmap(norm(v))), matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _series(t: FrozenTrial) -> tuple[list[int], list[float]]:
    steps = sorted(t.intermediate_values)
    return steps, [t.intermediate_values[k] for k in steps]


def _label_ends(ax: Any, trials: Sequence[FrozenTrial]) -> None:
    """ "#N" right of each trial's last point, best first, nudged down so none overlap."""
    low, high = ax.get_ylim()
    gap = (high - low) * 0.035
    previous = math.inf
    for t in trials:
        steps, bleu = _series(t)
        y = min(bleu[-1], previous - gap)
        ax.annotate(
            f"#{t.number}",
            (steps[-1], bleu[-1]),
            xytext=(steps[-1] + 0.12, y),
            va="center",
            fontsize=8,
        )
        previous = y


def _num(v: float, integer: bool) -> str:
    if integer:
        return str(int(round(v)))
    return f"{v:.1e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3g}"


def _cell(v: Any) -> str:
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------------------------
# command line


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="Report 03's figures and a Markdown summary from the live study",
        description="Write optuna_parallel.png, train_val_loss.png, param_importance.png, "
        "intermediate_bleu.png and REPORT.md (counts, top-trials table, GPU-seconds spent and "
        "saved by pruning, the best trial and how to promote it) into --out. A figure without "
        "data is left out and REPORT.md says why.",
    )
    p.add_argument("--study", help="study name (default: the storage's only study)")
    p.add_argument(
        "--storage", help="storage URL (default: $AMT_STORAGE_URL, else the embedded PostgreSQL)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and REPORT.md")
    p.add_argument(
        "--trials",
        type=_trial_list,
        metavar="N,N,...",
        help=f"trials whose loss curves are drawn (default: the best {DEFAULT_LOSS_TRIALS} "
        "complete ones)",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="DIR",
        help="a full run's directory (its metrics.jsonl) to draw too; repeatable (default: the "
        "study's promoted runs under $AMT_HOME/runs/<study>/full-trial-*)",
    )
    p.set_defaults(func=_report)


def _trial_list(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected trial numbers like 42,17,8, got {text!r}"
        ) from None


def _report(args: argparse.Namespace) -> int:
    if not str(args.out).strip():
        raise SearchError("--out is empty: give the directory for the figures and REPORT.md")
    path = write_report(args.study, args.out, args.storage, args.trials, args.run)
    print(f"wrote {path}")
    return 0
