"""P2: BLEU-4 evaluation with KV-cache decoding against decoding without a cache.

Three modes: ``cached`` (the trainer's default: KV cache; on a GPU the steps after the prompt
replayed as a CUDA graph), ``cached_eager`` (KV cache, every step launched from Python:
what the graph saves) and ``uncached`` (the reference).

Both timings are the trainer's own evaluation (``trainer.Run.evaluate``: val loss on the first
``eval_subset`` validation pairs, greedy translation of them in the trainer's batches, sacrebleu
BLEU-4) with the same weights (the EMA of a ``bench.real_run`` checkpoint with ``--from-run``;
else the freshly initialised model, which decodes to the length limit) in the same process.
Without a cache ``trainer.decode.generate(use_cache=False)`` recomputes the whole sequence at
every step; the benchmark switches to it by wrapping the ``generate`` that ``trainer.loop``
calls. Each mode is warmed up on a few pairs first; then full evaluations alternate between
the modes (``--repeats`` times, the fastest of each counts). The hypotheses are compared.

Evaluation's share of a trial (``configs/search.yaml``'s truncation budget: ``max_steps``
optimiser steps, an evaluation every ``eval_every`` steps on ``eval_subset`` pairs, a
checkpoint every ``train.checkpoint_every`` steps of a trial that is not pruned)::

    n_evals = ceil(max_steps / eval_every);  n_ckpt = max_steps // checkpoint_every
    eval_fraction = n_evals * eval_s
                    / (n_evals * eval_s + n_ckpt * checkpoint_s + max_steps * step_s)

with ``eval_s`` the cached evaluation measured here, ``checkpoint_s`` one checkpoint save of
this model, and ``step_s`` one optimiser step of the same recipe timed here after the decoding
(synchronised, warm-up excluded). With ``--from-run`` the run's own share,
``(wall_s - train_s) / wall_s`` from its result.json, is reported too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import common

log = logging.getLogger("bench.decode")

TARGETS = {"cache_speedup": 5.0, "eval_fraction_of_trial": 0.10}


MODES = {"cached": {}, "cached_eager": {"static": False}, "uncached": {"use_cache": False}}


@contextlib.contextmanager
def decoding(**options: Any) -> Iterator[None]:
    """Make the trainer's evaluation call ``generate`` with ``options`` (e.g. no KV cache)."""
    import trainer.loop as loop

    original = loop.generate
    loop.generate = functools.partial(original, **options)
    try:
        yield
    finally:
        loop.generate = original


def timed(fn: Any) -> tuple[Any, float]:
    common.synchronize()
    t0 = time.perf_counter()
    out = fn()
    common.synchronize()
    return out, time.perf_counter() - t0


def translate(run: Any, pairs: Any) -> list[str]:
    """The trainer's batched greedy translation of ``pairs`` with the evaluated weights."""
    model = run.ema if run.ema is not None else run.model
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32,
                        enabled=run.amp_dtype is not None):
        return list(run.translate(model, [ex.src_ids for ex in pairs]))


def compare(run: Any, repeats: int, warm_pairs: int, deadline: common.Deadline
            ) -> dict[str, dict[str, Any]]:
    """Warm every mode up on ``warm_pairs`` pairs, then time full evaluations, taking the modes
    in turn ``repeats`` times (the fastest of each counts), then, when the budget allows, the
    translation alone once per mode (``decode_s``; the hypotheses compared come from it, else
    from a last translation of the first ``warm_pairs`` pairs)."""
    out: dict[str, dict[str, Any]] = {name: {"eval_s_all": []} for name in MODES}
    for options in MODES.values():
        with decoding(**options):
            translate(run, run.eval_pairs[:warm_pairs])
    for r in range(repeats):
        for name, options in MODES.items():
            with decoding(**options):
                metrics, seconds = timed(run.evaluate)
            out[name]["eval_s_all"].append(round(seconds, 3))
            out[name].update(bleu=round(metrics["bleu"], 2),
                             val_loss=round(metrics["val_loss"], 4))
            log.info("%s: eval %.2f s, BLEU %.2f", name, seconds, metrics["bleu"])
        last_round = sum(o["eval_s_all"][-1] for o in out.values())
        if r + 1 < repeats and deadline.left() < 2.5 * last_round:
            break
    alone = deadline.left() > 1.2 * last_round + 30  # room left for step_s and the checkpoint
    pairs = run.eval_pairs if alone else run.eval_pairs[:warm_pairs]
    for name, options in MODES.items():
        with decoding(**options):
            hyps, seconds = timed(lambda: translate(run, pairs))
        out[name].update(eval_s=min(out[name]["eval_s_all"]),
                         decode_s=round(seconds, 3) if alone else None, hypotheses=hyps)
    return out


def profile(run: Any, top: int = 15) -> dict[str, Any]:
    """One cached evaluation under torch.profiler (``common.profile_ops``): where it goes."""
    return common.profile_ops(run.evaluate, top)


def step_seconds(run: Any, n_steps: int) -> float:
    """Median seconds of one optimiser step of the run's recipe (after one warm-up step)."""
    from bench.throughput import step_batches

    cfg = run.cfg.train
    steps = step_batches(run.data, cfg.tokens_per_batch, cfg.grad_accum, n_steps + 1, cfg.seed)
    times = []
    for i, batches in enumerate(steps):
        _, dt = timed(lambda b=batches: run.train_step(b))
        run.progress.step += 1
        if i:
            times.append(dt)
    return common.median(times)


def trial_budget() -> dict[str, int]:
    """``configs/search.yaml``'s truncation: what one trial trains, evaluates and saves."""
    raw = yaml.safe_load((common.REPO / "configs" / "search.yaml").read_text())
    t = raw["truncation"]
    every = (t.get("overrides") or {}).get("train.checkpoint_every", 0)
    return {"max_steps": int(t["max_steps"]), "eval_every": int(t["eval_every"]),
            "eval_subset": int(t["eval_subset"]), "checkpoint_every": int(every or 0)}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("decode", __doc__.split("\n")[0])
    p.add_argument("--from-run", help="a bench.real_run run directory: its config and EMA weights")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="validation pairs (default: search.yaml's truncation.eval_subset, 300)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimiser steps for step_s (default 4; --tiny 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed evaluations per mode, the fastest counts (default 2; --tiny 3)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one cached evaluation (torch.profiler): the top operators")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="no further repeat starts when it would overrun this (default 150)")
    args = p.parse_args(argv)
    common.setup_logging()
    deadline = common.Deadline(args.budget_s)
    budget = trial_budget()
    subset = args.eval_subset or (16 if args.tiny else budget["eval_subset"])
    wd = common.work_dir(args, "decode")
    overrides = {"train.eval_subset": subset, "train.out_dir": str(wd / "run"),
                 "train.compile": False}
    run_result: dict[str, Any] | None = None
    if args.from_run:
        from storage.checkpoints import latest_checkpoint
        from trainer.config import load_config
        from trainer.errors import ConfigError

        run_dir = Path(args.from_run)
        cfg = load_config(run_dir / "config.yaml", overrides)
        corpus, weights = f"from run {run_dir}", "EMA of the run's last checkpoint"
        result_path = run_dir / "result.json"
        if result_path.is_file():
            import json
            run_result = json.loads(result_path.read_text())
    else:
        cfg, corpus = common.recipe(args, wd, overrides)
        weights = "freshly initialised (seed 1234): decodes to the length limit"

    report = common.Report("decode", args, {
        "corpus": corpus, "weights": weights, "eval_subset": subset,
        "eval_max_new_tokens": cfg.train.eval_max_new_tokens,
        "decode_rows": cfg.train.eval_decode_rows,
        "beam_size": cfg.train.beam_size, "trial_budget": budget,
        "modes": {name: f"generate({', '.join(f'{k}={v}' for k, v in o.items())})"
                  for name, o in MODES.items()},
        "formula": "n_evals*eval_s / (n_evals*eval_s + n_ckpt*checkpoint_s + max_steps*step_s),"
                   " n_evals = ceil(max_steps/eval_every), n_ckpt = max_steps//checkpoint_every",
    })
    run = common.trainer_run(cfg)
    if args.from_run:
        checkpoint = latest_checkpoint(Path(args.from_run))
        if checkpoint is None:
            raise SystemExit(f"bench: error: no verified checkpoint in {args.from_run}")
        try:  # checks the checkpoint's model section (e.g. an old run's RoPE pairing)
            run.load_weights(checkpoint)
        except ConfigError as e:
            raise SystemExit(f"bench: error: {e}") from None
    log.info("evaluation of %d pairs: %s ...", subset, ", ".join(MODES))
    modes = compare(run, args.repeats or (3 if args.tiny else 2), min(8, subset), deadline)
    cached, eager, uncached = modes["cached"], modes["cached_eager"], modes["uncached"]
    for name, m in modes.items():
        report[name] = {k: v for k, v in m.items() if k != "hypotheses"}
    same = sum(a == b for a, b in zip(cached["hypotheses"], uncached["hypotheses"], strict=True))
    report["comparison"] = {
        "eval_speedup": round(uncached["eval_s"] / cached["eval_s"], 2),
        "decode_speedup": (round(uncached["decode_s"] / cached["decode_s"], 2)
                           if cached["decode_s"] else None),
        "graph_eval_speedup": round(eager["eval_s"] / cached["eval_s"], 2),
        "identical_hypotheses": f"{same}/{len(cached['hypotheses'])}",
        "bleu_difference": round(cached["bleu"] - uncached["bleu"], 2),
    }
    report.save()
    if args.profile:
        report["profile"] = profile(run)
        report.save()

    run.progress.step = 10**6  # a step number no checkpoint of this run uses
    _, checkpoint_s = timed(run._save)
    step_s = step_seconds(run, args.steps or (2 if args.tiny else 4))
    n_evals = math.ceil(budget["max_steps"] / budget["eval_every"])
    n_ckpt = budget["max_steps"] // budget["checkpoint_every"] if budget["checkpoint_every"] else 0
    per_eval = cached["eval_s"] * budget["eval_subset"] / subset
    train_s, eval_s = budget["max_steps"] * step_s, n_evals * per_eval
    ckpt_s = n_ckpt * checkpoint_s
    fraction = eval_s / (eval_s + ckpt_s + train_s)
    trial: dict[str, Any] = {
        "step_s": round(step_s, 4), "checkpoint_s": round(checkpoint_s, 3),
        "eval_s_at_trial_subset": round(per_eval, 3), "n_evals": n_evals,
        "n_checkpoints": n_ckpt, "eval_fraction_of_trial": round(fraction, 4),
        "checkpoint_fraction_of_trial": round(ckpt_s / (eval_s + ckpt_s + train_s), 4),
        "trial_train_s": round(train_s, 1), "trial_eval_s": round(eval_s, 1),
    }
    if run_result:
        train_s = run_result["tokens"] / max(run_result["tokens_per_s"], 1e-9)
        trial["from_run_eval_fraction"] = round(1 - train_s / run_result["wall_s"], 4)
    report["trial"] = trial
    report["verdict"] = {
        "targets": TARGETS,
        "cache_speedup": report["comparison"]["eval_speedup"],
        "cache_speedup_met": report["comparison"]["eval_speedup"] >= TARGETS["cache_speedup"],
        "eval_fraction_of_trial": trial["eval_fraction_of_trial"],
        "eval_fraction_met": fraction <= TARGETS["eval_fraction_of_trial"],
    }
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
