"""P6: idle time between two trials on one worker (target <= 2 s).

One worker (``search.worker.run_worker``, in this process) runs ``--trials`` short trials of a
fresh study on a scratch PostgreSQL database: on a GPU ``configs/search.yaml`` (the report's
three warm starts: 12L/768, 16L/768, 12L/512) cut to ``--max-steps`` optimiser steps and one
evaluation of ``--eval-subset`` pairs; with ``--tiny`` the small task of ``bench.pruning``.

Idle time from trial n's end to trial n+1's first training step::

    idle = (first_step_end[n+1] - steady_step_s[n+1]) - fit_end[n]

``fit_end`` is when ``trainer.fit`` returned (its final evaluation and checkpoint are part of
the trial); ``first_step_end`` is the first ``on_step`` callback of the next trial and
``steady_step_s`` the time between its first and second ``on_step``, so the start of the first
step is estimated and whatever the first step costs beyond a steady step (lazy CUDA/cuBLAS
work, compilation) counts as idle. The parts: ``after_fit`` (the objective's user attributes,
``tell``) up to Optuna's ``datetime_complete``; ``between_trials`` (stale-trial check, start
lock, budget check, ``ask``) up to the next ``datetime_start``; ``before_fit`` (suggestions,
run directory, config, parameter count); ``fit_setup`` (data, model, EMA, optimiser, first-step
overhead).

The search code records no fit or first-step timestamps yet, so the benchmark wraps the
``trainer.fit`` that ``search.objective`` calls to read them (see BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from bench import common

log = logging.getLogger("bench.idle")

TARGET_S = 2.0
MARKS: dict[int, dict[str, Any]] = {}  # trial number -> fit_start, fit_end, step_ends


class StepClock:
    """A ``trainer.fit`` callback that notes when the first optimiser steps end."""

    def __init__(self, marks: dict[str, Any]) -> None:
        self.marks = marks

    def on_step(self, step: int) -> None:
        if len(self.marks["step_ends"]) < 3:
            self.marks["step_ends"].append(time.time())


def instrument() -> None:
    """Wrap the ``trainer.fit`` that ``search.objective`` calls, recording timestamps."""
    import trainer
    from trainer import loop

    def timed_fit(cfg: Any, callbacks: Sequence[Any] = (), *, resume: bool = False) -> Any:
        found = re.search(r"trial-(\d+)$", str(cfg.train.out_dir))
        marks: dict[str, Any] = {"fit_start": time.time(), "step_ends": []}
        MARKS[int(found.group(1)) if found else -len(MARKS) - 1] = marks
        try:
            return loop.fit(cfg, [*callbacks, StepClock(marks)], resume=resume)
        finally:
            marks["fit_end"] = time.time()

    trainer.fit = timed_fit  # type: ignore[assignment]


def gaps(trials: list[Any]) -> list[dict[str, Any]]:
    """Idle time and its parts for each pair of consecutive trials."""
    out = []
    for prev, nxt in zip(trials, trials[1:], strict=False):
        a, b = MARKS.get(prev.number), MARKS.get(nxt.number)
        if not a or not b or len(b["step_ends"]) < 2 or prev.datetime_complete is None:
            out.append({"trials": [prev.number, nxt.number], "error": "missing timestamps"})
            continue
        steady = b["step_ends"][1] - b["step_ends"][0]
        first_step_start = b["step_ends"][0] - steady
        complete = prev.datetime_complete.timestamp()
        start = nxt.datetime_start.timestamp()
        out.append({
            "trials": [prev.number, nxt.number],
            "idle_s": round(first_step_start - a["fit_end"], 3),
            "after_fit_s": round(complete - a["fit_end"], 3),
            "between_trials_s": round(start - complete, 3),
            "before_fit_s": round(b["fit_start"] - start, 3),
            "fit_setup_s": round(first_step_start - b["fit_start"], 3),
            "first_step_s": round(b["step_ends"][0] - b["fit_start"], 3),
            "steady_step_s": round(steady, 4),
            "params": nxt.params,
        })
    return out


def study_config(args: Any, wd: Any, name: str) -> Any:
    """``configs/search.yaml`` cut to a few steps (GPU), or the small task (``--tiny``)."""
    if args.tiny:
        return common.small_task_search(wd, name, pruner="none", n_trials=args.trials,
                                        max_steps=6, eval_every=6, eval_subset=4)
    from search.config import load_search_config, search_config_from_dict, search_config_to_dict

    raw = search_config_to_dict(load_search_config(common.REPO / "configs" / "search.yaml"))
    data, _ = common.data_overrides(args, wd)
    truncation = raw["truncation"]
    truncation.update(max_steps=args.max_steps, eval_every=args.max_steps,
                      eval_subset=args.eval_subset)
    truncation["overrides"] = {**truncation["overrides"], "train.eval_max_new_tokens": 32}
    raw.update(name=name, n_trials=args.trials, timeout_s=None,
               overrides={**raw["overrides"], **data})
    return search_config_from_dict(raw)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("idle", __doc__.split("\n")[0])
    p.add_argument("--storage", help="a PostgreSQL server URL for the scratch database "
                   "(default: 127.0.0.1:5432 if it answers, else the embedded server)")
    p.add_argument("--trials", type=int, default=3, help="trials to run (3: two gaps)")
    p.add_argument("--max-steps", type=int, default=4, help="optimiser steps per trial (4)")
    p.add_argument("--eval-subset", type=int, default=16, help="pairs per evaluation (16)")
    p.add_argument("--cpu", action="store_true", help="run the trials on the CPU")
    args = p.parse_args(argv)
    common.setup_logging()
    wd = common.work_dir(args, "idle")
    common.amt_home(wd)
    gpu = None if args.cpu or not common.on_gpu() else 0
    server, where = common.server_url(args.storage)
    from storage.urls import mask_url

    dbs = common.ScratchDatabases(server, ["idle"])
    name = f"idle-{dbs.tag}"
    cfg = study_config(args, wd, name)
    report = common.Report("idle", args, {
        "study": "small task" if args.tiny else "configs/search.yaml (enqueued report trials)",
        "trials": args.trials, "trial_budget": {"max_steps": cfg.truncation.max_steps,
                                                "eval_subset": cfg.truncation.eval_subset},
        "device": "cpu" if gpu is None else f"cuda:{gpu}", "server": mask_url(server),
        "server_source": where,
        "formula": "idle = (first_step_end[n+1] - steady_step_s[n+1]) - fit_end[n]",
        "timestamps": "trainer.fit wrapped by the benchmark (fit start/end, on_step); Optuna "
                      "datetime_start/datetime_complete",
    })
    try:
        import optuna

        from search.study import create_study

        instrument()
        create_study(cfg, dbs.url("idle"))
        common.run_study_worker(name, dbs.url("idle"), gpu, args.trials)
        trials = sorted(optuna.load_study(study_name=name, storage=dbs.url("idle"))
                        .get_trials(deepcopy=False), key=lambda t: t.number)
        report["trial_states"] = [t.state.name for t in trials]
        report["gaps"] = rows = gaps(trials)
    finally:
        dbs.drop()
    measured = [r["idle_s"] for r in rows if "idle_s" in r]
    report["verdict"] = {"target_s": TARGET_S, "max_idle_s": max(measured, default=None),
                         "met": bool(measured) and max(measured) <= TARGET_S}
    report.finish("ok" if measured else "partial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
