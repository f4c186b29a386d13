"""The ``amt-search`` command line: thin parsers over importable functions.

User errors (bad config, bad storage URL, unknown study ...) are printed as one line,
``amt-search: error: ...``, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from search.errors import SearchError
from storage.errors import CheckpointError, StorageError
from trainer.errors import ConfigError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    StorageError,
    CheckpointError,
    SearchError,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} — see '{self.prog} --help'\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amt-search")
    except PackageNotFoundError:  # run from a checkout without installing it
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amt-search",
        description=(
            "Hyper-parameter search for the AMT translation decoder: a PostgreSQL-backed Optuna "
            "study, one worker per GPU, truncated trials pruned on BLEU-4, and promotion of the "
            "best trial to a full training run."
        ),
        epilog="Storage: --storage URL, else $AMT_STORAGE_URL, else an embedded PostgreSQL "
        "under $AMT_HOME (default ~/.local/state/amt-search).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    from search import commands

    commands.register(sub)
    from storage import cli as storage_cli

    storage_cli.register(sub)
    from search import deploy

    deploy.register(sub)
    from search import report

    report.register(sub)
    from search import quickstart

    quickstart.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"amt-search: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("amt-search: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'amt-search trials ... | head': the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a file the user named: --out onto a directory, no permission ...
        if e.filename is None:
            raise
        print(f"amt-search: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
