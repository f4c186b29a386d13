"""``amt-train``: train (or describe) one model from a YAML config.

    amt-train --config configs/bible.yaml [--set optim.lr=3e-4 ...] [--out-dir DIR] [--resume]
    amt-train --config configs/train.yaml --describe     # parameter counts, no data loaded
    torchrun --nproc-per-node N -m trainer.cli --config configs/train.yaml   # N GPUs, DDP

User errors (bad config, corrupt checkpoint, training that cannot go on) print one line,
``amt-train: error: ...``, and exit with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from storage.errors import WRITE_ERRNOS, CheckpointError, StorageError, write_hint
from trainer.config import TrainConfig, load_config, parse_override
from trainer.errors import ConfigError, TrainingFailed

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointError, StorageError, TrainingFailed,
)


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line, ``PROG: error: ... — see 'PROG --help'``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} — see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="amt-train", description=(
        "Train the AMT decoder (Report 03) on a parallel corpus; multi-GPU with "
        "'torchrun --nproc-per-node N -m trainer.cli --config ...'."))
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/bible.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=1e-4")
    parser.add_argument("--out-dir", help="run directory (overrides train.out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the run directory")
    parser.add_argument("--describe", action="store_true",
                        help="print the model's parameter counts and exit (loads no data)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def load(args: argparse.Namespace) -> TrainConfig:
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.out_dir is not None and not args.out_dir.strip():
        raise ConfigError("--out-dir is empty: give the run directory")
    if args.out_dir:
        overrides["train.out_dir"] = args.out_dir
    return load_config(args.config, overrides)


def describe(cfg: TrainConfig) -> str:
    """Shape and parameter counts, built on the meta device with ``data.vocab_size``."""
    import torch  # here, not at the top: bad input fails before torch's import (seconds)

    from trainer.model import DecoderLM

    with torch.device("meta"):
        counts = DecoderLM(cfg.model, cfg.data.vocab_size, pad_id=0).param_counts()
    m = cfg.model
    return "\n".join([
        f"model: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, "
        f"{m.positional}, {m.norm}-norm, {m.attention_mask} mask, vocab {cfg.data.vocab_size} "
        "(data.vocab_size; a small corpus may give fewer)",
        *(f"{name:>14}: {n:>12,} ({n / 1e6:.1f} M)" for name, n in counts.items()),
    ])


class Stopped(Exception):
    """SIGTERM, SIGHUP or a first Ctrl-C: the run stopped after a step, checkpoint saved."""

    def __init__(self, signum: int, step: int | None) -> None:
        when = "before training started" if step is None else f"after step {step}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}")
        self.signum = signum
        self.step = step


class _StopOnSignal:
    """Turns SIGTERM / SIGHUP / Ctrl-C into a clean stop at the end of the running step
    (``fit`` saves a checkpoint when a callback raises); a second Ctrl-C interrupts at once.
    One process only: under torchrun the ranks could stop at different steps."""

    def __init__(self) -> None:
        self.signum = 0
        self.training = False  # until the first step ends
        # a signal the process was started ignoring (nohup: SIGHUP; a background job: SIGINT)
        # stays ignored
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
                         if signal.getsignal(sig) is not signal.SIG_IGN}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.training:  # reading data, building the model: nothing to save yet
            raise Stopped(signum, None)
        self.signum = signum
        logging.getLogger("trainer").warning(
            "%s: stopping after this step (checkpoint saved)%s", signal.Signals(signum).name,
            "; Ctrl-C again to stop now" if signum == signal.SIGINT else "")

    def on_step(self, step: int) -> None:
        self.training = True
        if self.signum:
            raise Stopped(self.signum, step)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg: TrainConfig | None = None
    try:
        cfg = load(args)
        if args.describe:
            print(describe(cfg))
            return 0
        from trainer.loop import fit

        callbacks = [_StopOnSignal()] if int(os.environ.get("WORLD_SIZE", "1")) == 1 else []
        try:
            result = fit(cfg, callbacks, resume=args.resume)
        finally:
            for cb in callbacks:
                cb.restore()
    except USER_ERRORS as e:
        print(f"amt-train: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if e.step is None or cfg is None:
            print(f"amt-train: {e}", file=sys.stderr)
        else:
            print(f"amt-train: {e}; checkpoint saved in {cfg.train.out_dir} — continue with "
                  "--resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("amt-train: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None and e.errno not in WRITE_ERRNOS:
            raise
        out = cfg.train.out_dir if cfg is not None else "the run directory"
        where = e.filename or f"a file under {out} or the data cache"
        print(f"amt-train: error: {where}: {e.strerror}{write_hint(e)}", file=sys.stderr)
        return 2
    if rank == 0:
        test = (f", BLEU-4 {result.test_bleu:.2f} on the test split"
                if result.test_bleu is not None else "")
        print(f"BLEU-4 {result.bleu:.2f} on the validation subset{test}, val loss "
              f"{result.val_loss:.4f} (best "
              f"{result.best_val_loss:.4f} at step {result.best_step}), {result.steps} steps, "
              f"{result.tokens_per_s:,.0f} tokens/s, stopped by {result.stopped_by}; "
              f"results in {cfg.train.out_dir}/result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
