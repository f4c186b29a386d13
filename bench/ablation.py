"""Report 03 §6's ablation at the search's truncated budget: +RoPE (the report's trial 42),
sinusoidal positions, no label smoothing, 6 layers; same seed, same data, same budget.

Every variant is the trial-42 configuration (``configs/search.yaml``'s first enqueued trial)
trained exactly as a search trial would be (``search.config.trial_train_config``: the full
recipe cut to the truncation budget), with one key changed. Each reports the final BLEU-4 and
NDD of the EMA weights on the same validation subset, val loss, tokens/s and the loss curve.
``--max-steps``/``--eval-every``/``--grad-accum`` override the truncation (search.yaml's:
480 steps of one 16k-token micro-batch, an evaluation every 80 on 300 pairs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from bench import common

log = logging.getLogger("bench.ablation")

VARIANTS: dict[str, dict[str, Any]] = {
    "rope": {},  # the report's model: RoPE, label smoothing 0.1, 12 layers
    "sinusoid": {"model.positional": "sinusoidal"},
    "no_label_smoothing": {"optim.label_smoothing": 0.0},
    "six_layers": {"model.n_layers": 6},
    # not one of the report's (not run by default): the residual stream as autocast leaves it
    "fp32_residual": {"train.fp32_residual": True},
}
REPORT_VARIANTS = ["rope", "sinusoid", "no_label_smoothing", "six_layers"]


def search_config(args: Any, wd: Path) -> Any:
    """configs/search.yaml on the chosen corpus with the truncation overrides applied."""
    from search.config import load_search_config
    from trainer.config import apply_overrides

    raw = yaml.safe_load((common.REPO / "configs" / "search.yaml").read_text())
    data, _ = common.data_overrides(args, wd)
    base = yaml.safe_load((common.REPO / "configs" / "train.yaml").read_text())
    base = apply_overrides(base, {**data, "eval.ndd": True,
                                  **(common.TINY_OVERRIDES if args.tiny else {})})
    (wd / "ablation-train.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    raw["base_config"] = str(wd / "ablation-train.yaml")
    t = raw["truncation"]
    if args.max_steps or args.tiny:
        t["max_steps"] = args.max_steps or 8
        t["eval_every"] = max(1, t["max_steps"] // 6)
    if args.eval_every:
        t["eval_every"] = args.eval_every
    if args.eval_subset or args.tiny:
        t["eval_subset"] = args.eval_subset or 16
    t["overrides"] = {**t["overrides"], "train.compile": args.compile}
    if args.grad_accum:
        t["overrides"]["train.grad_accum"] = args.grad_accum
    path = wd / "ablation-search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_search_config(path)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ablation", __doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(REPORT_VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: the report's "
                   f"{', '.join(REPORT_VARIANTS)})")
    p.add_argument("--max-steps", type=int, default=None,
                   help="truncation max_steps (default: search.yaml's; --tiny 8)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="default: search.yaml's (max_steps // 6 with --max-steps)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="validation pairs decoded for BLEU-4 (default: search.yaml's)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimiser step (default: search.yaml's, 1)")
    p.add_argument("--compile", action="store_true", help="train.compile: true")
    args = p.parse_args(argv)
    common.setup_logging()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    wd = common.work_dir(args, "ablation")
    cfg = search_config(args, wd)
    base = dict(cfg.enqueue[0])  # the report's trial 42
    if args.tiny:  # the tiny shape instead of the report's
        base = {k: v for k, v in base.items() if not k.startswith("model.")}

    import trainer
    from search.config import trial_train_config

    report = common.Report("ablation", args, {
        "base_params": base, "truncation": {
            "max_steps": cfg.truncation.max_steps, "eval_every": cfg.truncation.eval_every,
            "eval_subset": cfg.truncation.eval_subset, **cfg.truncation.overrides},
        "variants": {n: VARIANTS[n] for n in names},
        "seed": "train.seed of the recipe, the same for every variant"})
    results: dict[str, Any] = {}
    report["results"] = results
    for name in names:
        train_cfg = trial_train_config(cfg, {**base, **VARIANTS[name]},
                                       out_dir=wd / name, name=f"ablation-{name}")
        log.info("%s: %s", name, VARIANTS[name] or "the report's configuration")
        r = trainer.fit(train_cfg)
        last = r.history[-1]
        results[name] = {
            "change": VARIANTS[name], "bleu": round(r.bleu, 3),
            "ndd": round(last["ndd"], 4) if "ndd" in last else None,
            "val_loss": round(r.val_loss, 4), "best_val_loss": round(r.best_val_loss, 4),
            "params_non_embedding": _non_embedding(train_cfg), "steps": r.steps,
            "tokens_per_s": round(r.tokens_per_s, 1), "wall_s": round(r.wall_s, 1),
            "run_dir": str(wd / name),
            "curve": [{k: round(m[k], 4) for k in ("step", "val_loss", "bleu") if k in m}
                      for m in r.history],
        }
        report.save()
    if "rope" in results:
        ref = results["rope"]["bleu"]
        report["bleu_vs_rope"] = {n: round(r["bleu"] - ref, 3) for n, r in results.items()}
    report.finish()
    return 0


def _non_embedding(cfg: Any) -> int:
    import torch

    from trainer.model import DecoderLM

    with torch.device("meta"):
        return DecoderLM(cfg.model, cfg.data.vocab_size, 0).param_counts()["non_embedding"]


if __name__ == "__main__":
    raise SystemExit(main())
