"""P5: compute to come within 0.5 BLEU-4 of the best configuration, Hyperband vs no pruning.

Two studies of the small task (``bench.common.small_task_search``: the synthetic word-by-word
translation, a 1-2 layer decoder, 180-step trials evaluated every 30 steps, 6 parameters)
differ only in the pruner: Hyperband with the service's default settings
(``configs/search.yaml``, ``search.config.PrunerConfig``: first rung at a third of the evals,
reduction factor 4) or none. Same TPE sampler and seed, same number of trials, one worker each
(``search.worker.run_worker``, in this process), on a scratch PostgreSQL database.

For each study, trials in order (one worker: number order), compute is summed over every
trial, pruned ones included, from the objective's own records (``cpu_seconds``, and
``wall_seconds`` which is what ``gpu_seconds`` is on a GPU); *time to target* is the sum up to
and including the first complete trial whose BLEU-4 is within ``--tolerance`` (0.5) of the
best complete trial of all studies of that seed. ratio = Hyperband / none (target <= 0.35).
A study that never reaches the target would need more than all it spent, so the ratio is
then a bound (``upper`` / ``lower``). With ``--seeds`` a,b,... the studies run once per sampler
seed, with ratios per seed and pooled (sums over the seeds). ``--pruners`` adds other pruners
of ``search.config`` (e.g. ``successive_halving``) for comparison; ``none`` is always the
baseline. Study names are fixed (``pruning-<pruner>-s<seed>``): Hyperband assigns brackets by
a hash of the study name, so a run is reproducible except for its timings.

``--task report`` runs the service's own study instead (``configs/search.yaml``: the report's
space, its three enqueued trials, TPE, the default Hyperband; ``--tiny``: the quickstart's, made
tiny) on the Bible with a ``--max-steps`` / ``--eval-every`` budget, each study bounded by
``--time-s`` (its ``timeout_s``: no trial starts after it) instead of a trial count. The studies
run side by side through ``amt-search launch``, one GPU each (``--gpus 0,1``; more GPUs than
studies: several seeds at once), or one CPU worker each; compute is then GPU-seconds
(``wall_seconds`` of a one-GPU worker). A study cut by time that never reached the target would
have needed more than it spent, so its ratio is a bound, as above.

``--replay FILE`` gives a ``--task report`` result (FILE) its exact unpruned counterpart: the
same trials, in the same order, each run to the full budget. Training is deterministic (the
trial seed is the recipe's, and the same configuration gave the same BLEU-4 to the last digit
on two H200 runs), so a trial Hyperband let finish is already what the unpruned study would
have run, and only the pruned ones are re-run in full, enqueued in trial order on a
no-pruning study, one GPU per seed, bounded by ``--time-s``. Their order and configurations
are the unpruned TPE study's own up to the sampler's ``n_startup_trials`` (search.yaml: 10,
the enqueued ones included), whose draws do not depend on results; after that they are the
trials Hyperband's TPE chose, run unpruned (an unpruned TPE study would have drawn others).
The replay first re-runs the cheapest finished trial (``calibration``): its time against the
original's says how far the two machines' timings differ, and it absorbs the new process's
start-up.

``--simulate FILE`` replays a pruner on recorded unpruned trials (FILE's ``none`` rows: a live
unpruned study, or a ``--replay`` result): the service's own pruner (``search.study.make_pruner``
of search.yaml with ``--pruners`` and ``--min-resource`` / ``--reduction-factor``) on an
in-memory study of the live study's name (Hyperband's brackets hash it), fed each trial's
recorded BLEU-4 curve; a trial it prunes at eval k costs its set-up (``wall_seconds`` minus the
fit's ``elapsed_s``) plus ``elapsed_s`` at eval k. Training is deterministic, so the decisions
are the live pruner's; only the costs are estimates. Only the trials before the sampler's
``n_startup_trials`` (enqueued ones included) are used: after them TPE's draws depend on what
the pruner did. Where FILE also holds the live pruned study (``--replay`` results), the
simulated decisions and compute to target are printed beside the live ones (``validation``).

``oracle`` bounds what any pruner could do on the unpruned study's own trials: one that knows
every final BLEU-4 and stops each trial before the first one to reach the target at eval k
(paying k / evals of its compute, start-up and evaluations pro rata, which flatters it), that
one run in full; ``ratio_at_eval[k]`` is its compute to target over the unpruned study's.
"""

from __future__ import annotations

import logging
from typing import Any

from bench import common

log = logging.getLogger("bench.pruning")

TARGET_RATIO = 0.35


def run_study(wd: Any, url: str, name: str, pruner: str, n_trials: int, seed: int,
              tiny: bool, gpu: int | None) -> list[dict[str, Any]]:
    """Create the study, run one worker until it is done; one row per trial."""
    import optuna

    from search.study import create_study

    sizes = {"max_steps": 12, "eval_every": 4, "eval_subset": 8} if tiny else {}
    cfg = common.small_task_search(wd, name, pruner=pruner, n_trials=n_trials, seed=seed, **sizes)
    create_study(cfg, url)
    common.run_study_worker(name, url, gpu, n_trials)
    return trial_rows(optuna.load_study(study_name=name, storage=url))


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per finished trial, in number order: state, BLEU-4, evals, compute, curve."""
    return [{"number": t.number, "state": t.state.name, "bleu": t.value,
             "evals": len(t.intermediate_values), "cpu_s": t.user_attrs.get("cpu_seconds"),
             "wall_s": t.user_attrs.get("wall_seconds"), "params": t.params,
             "curve": t.user_attrs.get("curve")}
            for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
            if t.state.is_finished()]


def run_report_studies(args: Any, wd: Any, url: str, seeds: list[int], pruners: list[str],
                        n_trials: int, slots: list[int | None],
                        raws: dict[int, dict[str, Any]] | None = None,
                        prefix: str = "pruning-report") -> dict[int, dict[str, list]]:
    """``--task report``: one study per (seed, pruner), created on ``url`` and run by
    ``amt-search launch`` with one worker, ``len(slots)`` of them at a time (a GPU index each,
    or None: a CPU worker). ``raws``: a study config per seed instead of search.yaml's
    (``n_trials`` 0: as many as it enqueues). Returns {seed: {pruner: rows}}."""
    import copy
    import os
    import subprocess
    import sys

    import optuna

    from search.config import search_config_from_dict
    from search.study import create_study

    base = None if raws else common.report_study_raw(args, wd, "pruning-report")[0]
    jobs = []
    for seed in seeds:
        for pruner in pruners:
            raw: dict[str, Any] = copy.deepcopy(raws[seed] if raws else base)  # type: ignore[arg-type]
            raw["name"] = f"{prefix}-{pruner}-s{seed}"
            raw["sampler"]["seed"] = seed
            raw["pruner"]["type"] = pruner  # search.yaml's rungs; ``none`` ignores them
            for key in ("min_resource", "reduction_factor"):
                if getattr(args, key, None) is not None:
                    raw["pruner"][key] = getattr(args, key)
            raw.update(n_trials=n_trials or len(raw["enqueue"]), timeout_s=args.time_s)
            create_study(search_config_from_dict(raw), url)
            jobs.append((seed, pruner, raw["name"]))
    for i in range(0, len(jobs), len(slots)):
        wave = list(zip(jobs[i:i + len(slots)], slots, strict=False))
        procs = []
        for (_, _, name), slot in wave:
            where = ["--cpu-workers", "1"] if slot is None else ["--gpus", str(slot)]
            log.info("study %s on %s ...", name, "a CPU worker" if slot is None else f"GPU {slot}")
            # worker index 0 whatever the GPU: a worker's sampler seed is seed + its index
            # (by default its GPU's), and the studies compared must draw from the same seed
            procs.append(subprocess.Popen([sys.executable, "-m", "search.cli", "launch",
                                           "--study", name, "--storage", url,
                                           "--progress-every", "60", *where],
                                          env={**os.environ, "AMT_WORKER_INDEX": "0"}))
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"bench: amt-search launch exited {proc.returncode}")
    out: dict[int, dict[str, list]] = {}
    for seed, pruner, name in jobs:
        out.setdefault(seed, {})[pruner] = trial_rows(optuna.load_study(study_name=name,
                                                                        storage=url))
    return out


def replay_pruned(args: Any, wd: Any, url: str, source: dict[str, Any], pruner: str,
                  slots: list[int | None]) -> dict[int, dict[str, Any]]:
    """``--replay``: for each seed of ``source`` (a ``--task report`` result), re-run its
    ``pruner`` study's pruned trials to the full budget (``run_report_studies``' launch, pruner
    none, the trials enqueued), then merge: {seed: {pruner: original rows, "none": rows}}."""
    import copy

    base, _, _ = common.report_study_raw(args, wd, "pruning-replay")
    plans = []
    for entry in source["per_seed"]:
        rows = entry["trials"][pruner]
        done = [r for r in rows if r["state"] == "COMPLETE" and r["wall_s"]]
        if not done:
            raise SystemExit(f"bench: seed {entry['seed']} has no complete {pruner} trial "
                             "to calibrate the replay with")
        calibration = min(done, key=lambda r: r["wall_s"])
        pruned = [r for r in rows if r["state"] == "PRUNED"]
        raw = copy.deepcopy(base)
        raw["enqueue"] = [calibration["params"]] + [r["params"] for r in pruned]
        plans.append((entry["seed"], raw, calibration, pruned))
    replayed = run_report_studies(args, wd, url, [seed for seed, *_ in plans], ["none"],
                                  0, slots, raws={seed: raw for seed, raw, *_ in plans},
                                  prefix="pruning-replay")
    out: dict[int, dict[str, Any]] = {}
    for (seed, _, calibration, _), entry in zip(plans, source["per_seed"], strict=True):
        rows = entry["trials"][pruner]
        merged, cal = merge_replay(rows, calibration, replayed[seed]["none"])
        out[seed] = {pruner: rows, "none": merged,
                     "calibration": {"trial": calibration["number"],
                                     "wall_s": calibration["wall_s"], "bleu": calibration["bleu"],
                                     "replay_wall_s": cal and cal["wall_s"],
                                     "replay_bleu": cal and cal["bleu"]}}
    return out


def merge_replay(rows: list[dict[str, Any]], calibration: dict[str, Any],
                 new: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict | None]:
    """The unpruned counterpart of ``rows``: each trial as it finished there, or, when it was
    pruned, its full-budget re-run from ``new`` (the replay study's rows: the calibration trial,
    then the pruned trials in order), up to the first pruned trial without one. Returns it
    and the calibration trial's re-run (None when it did not run)."""
    new = sorted(new, key=lambda r: r["number"])
    cal = new[0] if new and new[0]["params"] == calibration["params"] else None
    todo = [r for r in new[1 if cal else 0:] if r["state"] == "COMPLETE"]
    merged = []
    for r in rows:
        if r["state"] != "PRUNED":
            merged.append(r)
        elif todo and todo[0]["params"] == r["params"]:
            merged.append({**todo.pop(0), "number": r["number"], "replayed": True})
        else:
            break  # not re-run in time: the unpruned sequence is known up to here
    return merged, cal


def simulate(rows: list[dict[str, Any]], pruner: Any, study_name: str
             ) -> list[dict[str, Any]]:
    """``pruner`` replayed on unpruned ``rows`` (in order, full curves with ``elapsed_s``): one
    row per trial as the pruned study would have finished it, compute estimated."""
    import optuna

    study = optuna.create_study(study_name=study_name, direction="maximize", pruner=pruner)
    out = []
    for r in rows:
        curve = r["curve"]
        setup = r["wall_s"] - curve["elapsed_s"][-1]
        trial = study.ask()
        stopped = None
        for k, bleu in enumerate(curve["bleu"][:-1], start=1):  # never pruned at the last eval
            trial.report(bleu, k)
            if trial.should_prune():
                stopped = k
                break
        if stopped is None:
            trial.report(curve["bleu"][-1], len(curve["bleu"]))
            study.tell(trial, r["bleu"])
            out.append({**r, "simulated": True})
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            cost = round(setup + curve["elapsed_s"][stopped - 1], 2)
            out.append({**r, "state": "PRUNED", "bleu": curve["bleu"][stopped - 1],
                        "evals": stopped, "wall_s": cost, "cpu_s": None, "simulated": True})
    return out


def simulate_file(args: Any, source: dict[str, Any], pruners: list[str]
                  ) -> dict[int, dict[str, Any]]:
    """``--simulate``: {seed: {pruner: simulated rows, "none": the recorded rows,
    "validation": ...}} over the trials before TPE's ``n_startup_trials``."""
    import copy

    from search.config import load_search_config, search_config_from_dict, search_config_to_dict
    from search.study import make_pruner

    base = search_config_to_dict(load_search_config(common.REPO / "configs" / "search.yaml"))
    base["truncation"].update(max_steps=args.max_steps, eval_every=args.eval_every,
                              eval_subset=args.eval_subset)
    out: dict[int, dict[str, Any]] = {}
    for entry in source["per_seed"]:
        seed, studies = entry["seed"], entry["trials"]
        raw = copy.deepcopy(base)
        limit = raw["sampler"]["n_startup_trials"] if raw["sampler"]["type"] == "tpe" else None
        if "none" not in studies:
            raise SystemExit(f"bench: {args.simulate} has no unpruned trials for seed {seed} "
                             "(a --pruned-only result? give its --replay result)")
        none = [r for r in studies["none"] if limit is None or r["number"] < limit]
        if any(r["state"] != "COMPLETE" or not (r.get("curve") or {}).get("elapsed_s")
               for r in none):
            raise SystemExit(f"bench: seed {seed}: {args.simulate} has unpruned trials without a "
                             "full curve with elapsed_s (a result from before --simulate)")
        out[seed] = {"none": none}
        for pruner in pruners:
            raw["pruner"]["type"] = pruner
            for key in ("min_resource", "reduction_factor"):
                if getattr(args, key, None) is not None:
                    raw["pruner"][key] = getattr(args, key)
            name = f"pruning-report-{pruner}-s{seed}"
            out[seed][pruner] = simulate(none, make_pruner(search_config_from_dict(raw)), name)
            live = studies.get(pruner)
            if live is not None:
                out[seed].setdefault("validation", {})[pruner] = {
                    "live": "".join("C" if r["state"] == "COMPLETE" else str(r["evals"])
                                    for r in live[:len(none)]),
                    "simulated": "".join("C" if r["state"] == "COMPLETE" else str(r["evals"])
                                         for r in out[seed][pruner]),
                    "live_wall_s": [r["wall_s"] for r in live[:len(none)]],
                    "simulated_wall_s": [r["wall_s"] for r in out[seed][pruner]]}
    return out


def warm_up(wd: Any, tiny: bool) -> None:
    """Two steps of the small task first, so neither study's first trial pays for the
    tokenizer, the data cache and PyTorch's lazy start-up alone."""
    import dataclasses

    import trainer
    from search.config import trial_train_config

    cfg = common.small_task_search(wd, "warm-up", pruner="none", n_trials=1)
    cfg = dataclasses.replace(cfg, truncation=dataclasses.replace(
        cfg.truncation, max_steps=2, eval_every=2, eval_subset=4))
    trainer.fit(trial_train_config(cfg, {}, out_dir=wd / "warm-up"))


def time_to_target(rows: list[dict[str, Any]], target: float, key: str) -> float | None:
    """Compute (``key``) summed over trials up to the first complete one reaching ``target``."""
    spent = 0.0
    for r in rows:
        spent += r[key] or 0.0
        if r["state"] == "COMPLETE" and r["bleu"] is not None and r["bleu"] >= target:
            return round(spent, 2)
    return None


def summarise(studies: dict[str, list[dict[str, Any]]], tolerance: float,
              unit: str = "cpu_s") -> dict[str, Any]:
    """Best BLEU-4, the target, each study's compute to target, and each pruner against
    ``none``: ``ratio_<unit>_to_target`` with its ``ratio_bound`` (``exact``; ``upper`` when only
    the pruned study reached the target; ``lower`` when only the unpruned one did)."""
    best = max((r["bleu"] for rows in studies.values() for r in rows
                if r["state"] == "COMPLETE" and r["bleu"] is not None), default=None)
    out: dict[str, Any] = {"best_bleu": best}
    if best is None:
        return out
    target = best - tolerance
    out["target_bleu"] = round(target, 3)
    for pruner, rows in studies.items():
        out[pruner] = {
            "best_bleu": max((r["bleu"] for r in rows if r["state"] == "COMPLETE"
                              and r["bleu"] is not None), default=None),
            "complete": sum(r["state"] == "COMPLETE" for r in rows),
            "pruned": sum(r["state"] == "PRUNED" for r in rows),
            "total_cpu_s": round(sum(r["cpu_s"] or 0 for r in rows), 2),
            "total_wall_s": round(sum(r["wall_s"] or 0 for r in rows), 2),
            "evals": sum(r["evals"] for r in rows),
            "cpu_s_to_target": time_to_target(rows, target, "cpu_s"),
            "wall_s_to_target": time_to_target(rows, target, "wall_s"),
        }
    if "none" in studies:
        out["signal"] = signal(studies["none"])
        out["oracle"] = oracle(studies["none"], target, out["none"][f"{unit}_to_target"], unit)
    for pruner in studies if "none" in studies else []:
        if pruner == "none":
            continue
        row = out[pruner]
        for unit in ("cpu_s", "wall_s"):
            row[f"ratio_{unit}_to_target"], row["ratio_bound"] = _ratio(row, out["none"], unit)
        for unit in ("cpu_s", "wall_s"):
            row[f"ratio_total_{unit}"] = round(row[f"total_{unit}"]
                                               / max(out["none"][f"total_{unit}"], 1e-9), 3)
    return out


def signal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well each eval ranks the unpruned trials by their final BLEU-4: Spearman's rho of
    BLEU-4 and of -val loss at eval k against the final BLEU-4, over the complete trials."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["bleu"] is not None
            and r.get("curve") and r["curve"].get("bleu")]
    if len(done) < 3:
        return {}
    n = min(len(r["curve"]["bleu"]) for r in done)
    final = [r["bleu"] for r in done]
    out: dict[str, Any] = {"trials": len(done), "step": done[0]["curve"].get("step", [])[:n]}
    for key, sign in (("bleu", 1.0), ("val_loss", -1.0)):
        if all(key in r["curve"] for r in done):
            out[f"rho_{key}"] = [spearman([sign * r["curve"][key][k] for r in done], final)
                                 for k in range(n)]
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when one side is constant."""
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return None if va == 0 or vb == 0 else round(cov / (va * vb) ** 0.5, 3)


def oracle(rows: list[dict[str, Any]], target: float, spent: float | None,
           unit: str = "cpu_s") -> dict[str, Any]:
    """CPU-seconds to ``target`` of an all-knowing pruner on these (unpruned) trials, stopping
    every trial before the first one reaching it at eval k; over ``spent``, the trials' own."""
    if spent is None:
        return {f"{unit}_at_eval": None, "ratio_at_eval": None}
    n = max(r["evals"] for r in rows)
    cost = {k: 0.0 for k in range(1, n + 1)}
    for r in rows:
        done = r["state"] == "COMPLETE" and r["bleu"] is not None and r["bleu"] >= target
        for k in cost:
            cost[k] += (r[unit] or 0.0) * (1.0 if done else k / max(r["evals"], 1))
        if done:
            break
    return {f"{unit}_at_eval": {k: round(v, 2) for k, v in cost.items()},
            "ratio_at_eval": {k: round(v / max(spent, 1e-9), 3) for k, v in cost.items()}}


def _ratio(pruned: dict[str, Any], none: dict[str, Any], unit: str
           ) -> tuple[float | None, str]:
    """Pruned / none of the compute to target, or a bound when one study missed it."""
    a, b = pruned[f"{unit}_to_target"], none[f"{unit}_to_target"]
    if a is not None and b is not None:
        return round(a / b, 3), "exact"
    if a is not None:
        return round(a / max(none[f"total_{unit}"], 1e-9), 3), "upper"
    if b is not None:
        return round(pruned[f"total_{unit}"] / b, 3), "lower"
    return None, "none reached"


def main(argv: list[str] | None = None) -> int:
    p = common.parser("pruning", __doc__.split("\n")[0])
    p.add_argument("--task", choices=("small", "report"), default="small",
                   help="small: the synthetic task, 20-trial studies one after the other "
                   "(default); report: configs/search.yaml's study on the Bible, studies side "
                   "by side, bounded by --time-s")
    p.add_argument("--storage", help="a PostgreSQL server URL for the scratch database "
                   "(default: 127.0.0.1:5432 if it answers, else the embedded server)")
    p.add_argument("--trials", type=int, default=None,
                   help="trials per study (default 20; --tiny 3; --task report: 200, so "
                   "--time-s bounds it)")
    p.add_argument("--seeds", default="1234", help="sampler seeds, comma-separated (1234)")
    p.add_argument("--pruners", default="hyperband",
                   help="pruners compared with none, comma-separated (hyperband)")
    p.add_argument("--tolerance", type=float, default=0.5, help="BLEU-4 points (0.5)")
    p.add_argument("--gpu", type=int, default=None, help="small task: run the trials on this GPU")
    p.add_argument("--gpus", default=None,
                   help="report task: GPU indices such as 0,1, one study on each at a time "
                   "(default: one CPU worker per study)")
    p.add_argument("--time-s", type=float, default=400.0,
                   help="report task: each study's timeout_s (400)")
    p.add_argument("--max-steps", type=int, default=240, help="report task: trial steps (240)")
    p.add_argument("--eval-every", type=int, default=40, help="report task (40)")
    p.add_argument("--eval-subset", type=int, default=300, help="report task (300)")
    p.add_argument("--min-resource", type=int, default=None,
                   help="report task: the pruner's first rung in evals (search.yaml's)")
    p.add_argument("--reduction-factor", type=int, default=None,
                   help="report task: the pruner's reduction factor (search.yaml's)")
    p.add_argument("--pruned-only", action="store_true",
                   help="report task: run the pruned studies only, two seeds at once on two "
                   "GPUs; their unpruned counterparts come from a later --replay")
    p.add_argument("--replay", metavar="FILE",
                   help="a --task report result: run its unpruned counterpart (its pruned "
                   "trials re-run in full, one GPU per seed) and compare; the trial budget and "
                   "pruner settings are FILE's")
    p.add_argument("--simulate", metavar="FILE[,FILE]",
                   help="replay --pruners (search.yaml's settings, or --min-resource / "
                   "--reduction-factor) on FILE's recorded unpruned trials; no training")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for PyTorch (1: a worker per core; oversubscribed "
                   "threads spin and inflate CPU-seconds)")
    args = p.parse_args(argv)
    common.setup_logging()
    import torch

    torch.set_num_threads(args.threads)
    source: dict[str, Any] = {}
    if args.simulate and args.replay:
        raise SystemExit("bench: give --simulate or --replay, not both")
    if args.replay or args.simulate:
        args.replay = args.replay or args.simulate
        import json
        from pathlib import Path

        files = args.replay.split(",") if args.simulate else [args.replay]
        sources = [json.loads(Path(f).read_text()) for f in files]
        source = sources[0]
        for f, other in zip(files[1:], sources[1:], strict=True):
            if any(other["config"].get(k) != source["config"].get(k)
                   for k in ("max_steps", "eval_every", "eval_subset", "unit")):
                raise SystemExit(f"bench: {f} has another trial budget than {files[0]}")
            source = {**source, "per_seed": source["per_seed"] + other["per_seed"]}
        args.task = "report"
        args.seeds = ",".join(str(s["seed"]) for s in source["per_seed"])
        if not args.simulate:
            args.pruners = ",".join(p for p in source["config"]["pruners"] if p != "none")
        for key in ("max_steps", "eval_every", "eval_subset") + (
                () if args.simulate else ("min_resource", "reduction_factor")):
            if key not in source["config"]:
                raise SystemExit(f"bench: {args.replay} has no config.{key} (a result from "
                                 "before --replay): give --task report results of this version")
            setattr(args, key, source["config"][key])
    report_task = args.task == "report"
    if report_task and args.tiny:
        args.max_steps, args.eval_every, args.eval_subset = 12, 4, 8
    n_trials = args.trials or (3 if args.tiny else 200 if report_task else 20)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pruners = [x for x in args.pruners.split(",") if x.strip() and x != "none"] + ["none"]
    if args.pruned_only and not args.replay:
        if not report_task:
            raise SystemExit("bench: --pruned-only is for --task report")
        pruners = pruners[:-1]
    slots: list[int | None] = ([int(g) for g in args.gpus.split(",")] if args.gpus
                               else [None] * len(pruners))
    unit = "wall_s" if report_task and args.gpus else "cpu_s"
    if args.simulate:
        unit = source["config"]["unit"]
    wd = common.work_dir(args, "pruning")
    common.amt_home(wd)
    from storage.urls import mask_url

    server, where = (("", "none: simulated") if args.simulate
                     else common.server_url(args.storage))

    if report_task:
        task = {"task": f"configs/{'quickstart' if args.tiny else 'search'}.yaml's study",
                "trial": f"{args.max_steps} steps, eval every {args.eval_every}",
                "max_steps": args.max_steps, "eval_every": args.eval_every,
                "eval_subset": args.eval_subset, "min_resource": args.min_resource,
                "reduction_factor": args.reduction_factor,
                "time_s_per_study": args.time_s, "gpus": args.gpus,
                "compute": "GPU-seconds (wall_seconds of a one-GPU worker)" if args.gpus
                else "objective's cpu_seconds (process CPU time) per trial"}
    else:
        task = {"task": "synthetic word-by-word translation (bench.common.small_task_search)",
                "trial": "12 steps, eval every 4" if args.tiny
                else "180 steps, eval every 30 (6 evals)", "space": common.SMALL_TASK_SPACE,
                "compute": "objective's cpu_seconds (process CPU time) and wall_seconds "
                "per trial", "torch_threads": args.threads}
    report = common.Report("pruning", args, {
        **task, "trials_per_study": n_trials, "seeds": seeds, "tolerance_bleu": args.tolerance,
        "pruners": pruners, "unit": unit, "server": server and mask_url(server),
        "server_source": where,
    })
    dbs = None if args.simulate else common.ScratchDatabases(server, ["pruning"])
    url = dbs.url("pruning") if dbs else ""
    per_seed: list[dict[str, Any]] = []
    report["per_seed"] = per_seed
    try:
        if args.simulate:
            report["simulated_from"] = args.simulate
            by_seed = simulate_file(args, source, pruners[:-1])
        elif source:
            if len(pruners) != 2:
                raise SystemExit(f"bench: --replay takes a result of one pruner, {args.replay} "
                                 f"has {pruners[:-1]}")
            report["replay_of"] = args.replay
            by_seed = replay_pruned(args, wd, url, source, pruners[0], slots)
        elif report_task:
            by_seed = run_report_studies(args, wd, url, seeds, pruners, n_trials, slots)
        else:
            warm_up(wd, args.tiny)
            by_seed = {}
        for i, seed in enumerate(seeds):
            studies = by_seed.get(seed, {})
            calibration = studies.pop("calibration", None)
            validation = studies.pop("validation", None)
            for pruner in [] if report_task else pruners if i % 2 == 0 else pruners[::-1]:
                name = f"pruning-{pruner}-s{seed}"
                log.info("study %s: %d trials ...", name, n_trials)
                studies[pruner] = run_study(wd, url, name, pruner, n_trials, seed, args.tiny,
                                            args.gpu)
            per_seed.append({"seed": seed, "summary": summarise(studies, args.tolerance, unit),
                             "trials": studies})
            if calibration is not None:
                per_seed[-1]["calibration"] = calibration
            if validation is not None:
                per_seed[-1]["validation"] = validation
            report.save()
    finally:
        if dbs:
            dbs.drop()
    report["pooled"] = {p: pooled(per_seed, p, unit) for p in pruners if p != "none"}
    report["pooled"]["oracle"] = pooled_oracle(per_seed, unit)
    hb = report["pooled"].get("hyperband", {})
    ratio = hb.get(f"ratio_{unit}_to_target")
    report["verdict"] = {"target_ratio": TARGET_RATIO, "unit": unit, **hb,
                         "met": ratio is not None and ratio <= TARGET_RATIO
                         and hb["ratio_bound"] in ("exact", "upper")}
    report.finish()
    return 0


def pooled(per_seed: list[dict[str, Any]], pruner: str, unit: str = "cpu_s") -> dict[str, Any]:
    """``pruner`` against ``none`` over all seeds: CPU-seconds to target summed per pruner, a
    study that missed the target counting with its total (the pooled ratio is then a bound)."""
    sums = {pruner: 0.0, "none": 0.0}
    missed = {pruner: False, "none": False}
    for s in per_seed:
        for p in sums:
            row = s["summary"].get(p)
            if row is None:
                return {f"ratio_{unit}_to_target": None, "ratio_bound": "no result"}
            value = row[f"{unit}_to_target"]
            missed[p] |= value is None
            sums[p] += row[f"total_{unit}"] if value is None else value
    if missed[pruner] and missed["none"]:
        bound = "mixed"
    else:
        bound = "upper" if missed["none"] else "lower" if missed[pruner] else "exact"
    return {f"ratio_{unit}_to_target": round(sums[pruner] / sums["none"], 3) if sums["none"]
            else None, "ratio_bound": bound,
            "per_seed": [[s["summary"].get(pruner, {}).get(f"ratio_{unit}_to_target"),
                          s["summary"].get(pruner, {}).get("ratio_bound")] for s in per_seed]}


def pooled_oracle(per_seed: list[dict[str, Any]], unit: str = "cpu_s") -> dict[str, Any]:
    """The oracle's compute to target over the unpruned studies', summed over the seeds where
    the unpruned study reached the target (``seeds``)."""
    kept = [s for s in per_seed
            if (s["summary"].get("oracle") or {}).get(f"{unit}_at_eval") is not None]
    if not kept:
        return {"ratio_at_eval": None, "seeds": []}
    costs = [s["summary"]["oracle"][f"{unit}_at_eval"] for s in kept]
    spent = sum(s["summary"]["none"][f"{unit}_to_target"] for s in kept)
    evals = set.intersection(*(set(c) for c in costs))
    return {"ratio_at_eval": {k: round(sum(c[k] for c in costs) / spent, 3)
                              for k in sorted(evals)},
            "seeds": [s["seed"] for s in kept]}


if __name__ == "__main__":
    raise SystemExit(main())
