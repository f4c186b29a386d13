"""``amt-search db status | url | stop``: see and stop the embedded PostgreSQL."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("db", help="see or stop the embedded PostgreSQL server")
    p.add_argument("action", choices=["status", "url", "stop"])
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise NotImplementedError("storage helper fills this in")
