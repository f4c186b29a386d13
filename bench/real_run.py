"""Issue 2's must-show: one real ``trainer.fit`` with the report's shape on the Bible en->fr.

The recipe is ``configs/bible.yaml`` (Report 03's model and optimiser with a schedule fitted to
the Bible) cut to a fixed budget: ``--max-steps`` optimiser steps (the warm-up fraction and the
cosine decay follow it) and ``--max-time-s`` seconds of wall clock, evaluations included,
whichever comes first; early stopping off. It reports the trainer's own figures: tokens/s of
training (evaluations excluded), val loss and BLEU-4 of the EMA weights at the end, and the
loss curve of every evaluation. ``--describe`` adds the parameter counts (no training).

The fit writes to ``<--run-dir>/run`` (config, metrics, checkpoints, result.json);
``bench.decode --from-run <--run-dir>/run`` reuses its weights and timings.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch

from bench import common

log = logging.getLogger("bench.real_run")


def param_counts(cfg: Any, vocab: int) -> dict[str, Any]:
    """Counts of the configured model and of the report's 6-layer variant (meta device)."""
    from trainer.model import DecoderLM

    out: dict[str, Any] = {}
    for name, layers in (("configured", cfg.model.n_layers), ("six_layer_variant", 6)):
        model_cfg = common.apply(cfg, {"model.n_layers": layers}).model
        with torch.device("meta"):
            out[name] = {"n_layers": layers, **DecoderLM(model_cfg, vocab, 0).param_counts()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("real_run", __doc__.split("\n")[0])
    p.add_argument("--config", default="bible.yaml", help="recipe under configs/ (bible.yaml)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimiser steps (default 240; --tiny 12)")
    p.add_argument("--max-time-s", type=float, default=None,
                   help="wall-clock budget of the fit, evaluations included (default 170)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="optimiser steps between evaluations (default max_steps // 3)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="validation pairs decoded for BLEU-4 (default: the config's, 500)")
    p.add_argument("--compile", action="store_true", help="train.compile: true")
    p.add_argument("--run-dir", dest="work_dir", help="keep the run here (default: a temp dir)")
    p.add_argument("--describe", action="store_true",
                   help="only print the parameter counts (loads no data)")
    args = p.parse_args(argv)
    common.setup_logging()
    max_steps = args.max_steps or (12 if args.tiny else 240)
    max_time = args.max_time_s or (60.0 if args.tiny else 170.0)
    overrides: dict[str, Any] = {
        "train.max_steps": max_steps, "train.max_time_s": max_time,
        "train.eval_every": args.eval_every or max(1, max_steps // 3),
        "train.early_stopping_patience": 0, "train.compile": args.compile,
    }
    if args.eval_subset:
        overrides["train.eval_subset"] = args.eval_subset
    wd = common.work_dir(args, "real_run")
    overrides["train.out_dir"] = str(wd / "run")
    cfg, corpus = common.recipe(args, wd, overrides, base=args.config)

    from trainer.cli import describe
    report = common.Report("real_run", args, {"corpus": corpus, "recipe": f"configs/{args.config}",
                                              "budget": {"max_steps": max_steps,
                                                         "max_time_s": max_time},
                                              "train_config": asdict(cfg)})
    if args.describe:
        report["describe"] = describe(cfg).splitlines()
        report["params"] = param_counts(cfg, cfg.data.vocab_size)
        report.finish()
        return 0

    import trainer
    from trainer.data import prepare

    data = prepare(cfg.data)
    report["data"] = {"train_pairs": len(data.train), "val_pairs": len(data.val),
                      "vocab": data.vocab_size, "fingerprint": data.fingerprint[:16],
                      "padding_fraction": round(data.padding_fraction(
                          data.train, cfg.train.tokens_per_batch), 4)}
    report["params"] = param_counts(cfg, data.vocab_size)
    report.save()
    log.info("fit: %d steps or %.0f s, eval every %d, out %s", max_steps, max_time,
             cfg.train.eval_every, cfg.train.out_dir)
    r = trainer.fit(cfg)
    train_s = r.tokens / r.tokens_per_s if r.tokens_per_s else 0.0
    report["result"] = {
        "tokens_per_s": round(r.tokens_per_s, 1),
        "val_loss": round(r.val_loss, 4),
        "bleu": round(r.bleu, 2),
        "bleu_weights": "EMA" if cfg.train.ema_decay > 0 else "raw",
        "bleu_signature": r.bleu_signature,
        "test_bleu": getattr(r, "test_bleu", None),  # eval.test: the whole test split
        "best_val_loss": round(r.best_val_loss, 4),
        "best_step": r.best_step,
        "steps": r.steps,
        "tokens": r.tokens,
        "epochs": round(r.tokens / max(1, _epoch_tokens(data)), 2),
        "wall_s": round(r.wall_s, 1),
        "train_s": round(train_s, 1),
        "eval_and_checkpoint_s": round(r.wall_s - train_s, 1),
        "stopped_by": r.stopped_by,
        "micro_batch_tokens": r.micro_batch_tokens,
        "checkpoint": r.checkpoint,
        "run_dir": cfg.train.out_dir,
    }
    keys = ("step", "tokens", "train_loss", "val_loss", "bleu", "ndd", "lr", "tokens_per_s",
            "elapsed_s")
    report["loss_curve"] = [{k: _round(m[k]) for k in keys if k in m} for m in r.history]
    report.finish()
    return 0


def _epoch_tokens(data: Any) -> int:
    return int(data.train.seq_lens.sum())


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


if __name__ == "__main__":
    raise SystemExit(main())
