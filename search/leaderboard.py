"""The study as a table: Report 03 §4's columns (trial, layers, hidden, LR, BLEU-4) plus the
trial's state and the compute it used, as a Markdown table, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config import SearchConfig, full_run_dict
from search.study import count_trials
from trainer.errors import ConfigError

__all__ = ["FORMATS", "best_trial", "format_rows", "status", "trial_row", "trial_rows"]

FORMATS = ("table", "csv", "json")
_HEADERS = {
    "trial": "Trial",
    "layers": "Layers",
    "hidden": "Hidden",
    "lr": "LR",
    "bleu4": "BLEU-4",
    "state": "State",
    "evals": "Evals",
    "compute_s": "GPU-s",
}


def trial_params(t: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters; for a waiting warm start, the ones it was enqueued with."""
    return dict(t.params) or dict(t.system_attrs.get("fixed_params", {}))


def trial_row(cfg: SearchConfig, t: FrozenTrial) -> dict[str, Any]:
    """One leaderboard row. Layers, hidden size and LR are the values the trial trains with
    (searched or taken from the recipe). ``bleu4`` is the final BLEU-4 of a complete trial;
    ``last_bleu4`` the latest reported one (where a pruned trial stopped)."""
    params = trial_params(t)
    try:
        run = full_run_dict(cfg, params)
        layers, hidden, lr = run["model"]["n_layers"], run["model"]["d_model"], run["optim"]["lr"]
    except (ConfigError, KeyError):  # a partial or odd trial: show what it has
        layers, hidden, lr = (
            params.get(k) for k in ("model.n_layers", "model.d_model", "optim.lr")
        )
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    attrs = t.user_attrs
    return {
        "trial": t.number,
        "layers": layers,
        "hidden": hidden,
        "lr": lr,
        "bleu4": t.value if t.state == TrialState.COMPLETE else None,
        "last_bleu4": last,
        "state": t.state.name,
        "evals": len(t.intermediate_values),
        "gpu_seconds": attrs.get("gpu_seconds"),
        "cpu_seconds": attrs.get("cpu_seconds"),
        "val_loss": attrs.get("val_loss"),
        "fail_reason": attrs.get("fail_reason"),
        "retry_of": t.system_attrs.get("failed_trial"),
        "params": params,
    }


def trial_rows(study: optuna.Study, cfg: SearchConfig, sort: str = "bleu") -> list[dict[str, Any]]:
    """Every trial; ``sort="bleu"``: complete trials best first, then pruned ones by their
    last BLEU-4, then the rest by number. ``sort="number"``: by trial number."""
    rows = [trial_row(cfg, t) for t in study.get_trials(deepcopy=False)]
    if sort == "number":
        return sorted(rows, key=lambda r: r["trial"])
    rank = {"COMPLETE": 0, "PRUNED": 1}

    def key(r: dict[str, Any]) -> tuple[int, float, int]:
        score = r["bleu4"] if r["bleu4"] is not None else r["last_bleu4"]
        return (rank.get(r["state"], 2), -(score if score is not None else -1.0), r["trial"])

    return sorted(rows, key=key)


def _state(r: dict[str, Any]) -> str:
    """A failed trial's cell says why: STOPPED (Ctrl-C, SIGTERM: its retry is queued) or
    FAIL (nan_loss), FAIL (invalid_params) ..."""
    reason = r.get("fail_reason")
    if r["state"] != "FAIL" or not reason:
        return str(r["state"])
    return "STOPPED" if reason == "stopped" else f"FAIL ({reason})"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def status(study: optuna.Study, cfg: SearchConfig, top: int = 5) -> dict[str, Any]:
    """Counts (per retry chain, see :func:`search.study.count_trials`), budget, best trial,
    compute spent and the ``top`` trials."""
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    best = best_trial(study)
    return {
        "study": study.study_name,
        "n_trials": cfg.n_trials,
        "timeout_s": cfg.timeout_s,
        "finished": counts.finished,
        "complete": counts.complete,
        "pruned": counts.pruned,
        "failed": counts.failed,
        "running": counts.running,
        "waiting": counts.waiting,
        "best_trial": best.number if best else None,
        "best_bleu4": best.value if best else None,
        "gpu_seconds": _total(trials, "gpu_seconds"),
        "cpu_seconds": _total(trials, "cpu_seconds"),
        "top": trial_rows(study, cfg)[:top],
    }


def _total(trials: list[FrozenTrial], key: str) -> float | None:
    """The sum over the trials that recorded ``key``; None when none did (no GPU-seconds on a
    CPU study, as each of its trials says)."""
    values = [float(t.user_attrs[key]) for t in trials if t.user_attrs.get(key) is not None]
    return round(sum(values), 1) if values else None


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """``table``: Markdown like Report 03 §4; ``csv``: every field and a column per searched
    parameter; ``json``: every field, the parameters under ``params``."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        fieldnames = [k for k in (rows[0] if rows else _HEADERS) if k != "params"]
        params = sorted({k for r in rows for k in r.get("params") or {}})  # a column each
        writer = csv.DictWriter(buf, fieldnames=fieldnames + [k for k in params
                                                              if k not in fieldnames],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**(r.get("params") or {}), **r} for r in rows)
        return buf.getvalue().rstrip("\n")
    gpu = any(r.get("gpu_seconds") for r in rows)
    headers = dict(_HEADERS, compute_s="GPU-s" if gpu else "CPU-s")
    cells = [[headers[k] for k in headers]]
    for r in rows:
        compute = r["gpu_seconds"] if gpu else r["cpu_seconds"]
        cells.append(
            [
                str(r["trial"]),
                _fmt(r["layers"]),
                _fmt(r["hidden"]),
                f"{r['lr']:.1e}" if isinstance(r["lr"], float) else _fmt(r["lr"]),
                _bleu(r),
                _state(r),
                str(r["evals"]),
                ""
                if compute is None
                else f"{compute:.0f}"
                if compute >= 100
                else f"{compute:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _bleu(r: dict[str, Any]) -> str:
    if r["bleu4"] is not None:
        return f"{r['bleu4']:.2f}"
    if r["last_bleu4"] is not None:  # where a pruned (or running) trial stands
        return f"({r['last_bleu4']:.2f})"
    return ""


def _fmt(v: Any) -> str:
    return "" if v is None else str(v)
