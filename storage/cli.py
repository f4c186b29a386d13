"""``amt-search db status | url | stop``: see and stop the embedded PostgreSQL."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from storage import embedded
from storage.urls import ENV_VAR, check_url, mask_url, resolve_url


def register(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="see or stop the embedded PostgreSQL server",
        description="status: is the embedded PostgreSQL running, where, how many clients. "
        "url: the storage URL amt-search uses (--storage, else $AMT_STORAGE_URL, else the "
        "embedded server, which it starts if needed). stop: stop the embedded server; refused "
        "while clients are connected (running workers would start it again) unless --force.",
    )
    p.add_argument("action", choices=["status", "url", "stop"])
    p.add_argument("--storage", metavar="URL", help="url: the storage URL to show (default: "
                   "$AMT_STORAGE_URL); status and stop always concern the embedded server")
    p.add_argument("--show-password", action="store_true", help="print the URL with its password")
    p.add_argument("--force", action="store_true",
                   help="stop: stop the server even with clients connected (they get a "
                   "connection error; a worker waits and starts it again)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.action == "url":
        url = resolve_url(args.storage)
        print(url if args.show_password else mask_url(url))
    elif args.action == "stop":
        external = args.storage or os.environ.get(ENV_VAR)
        if external and not embedded.is_embedded_url(external):
            print(f"note: {mask_url(external)} is not the embedded server; stopping the "
                  "embedded one only")
        info = embedded.status() if not args.force else {}
        if info.get("running") and info.get("connections") is None:
            print("amt-search: error: the embedded PostgreSQL (pid "
                  f"{info['pid']}) does not answer (stopped or busy?): it cannot say who is "
                  "connected; try again, or pass --force", file=sys.stderr)
            return 2
        clients = info.get("connections")
        if clients:
            print(f"amt-search: error: the embedded PostgreSQL has {clients} client "
                  "connection(s) (workers, the dashboard?): running workers would start it "
                  "again; stop them first (Ctrl-C the launch), or pass --force",
                  file=sys.stderr)
            return 2
        stopped = embedded.stop()
        print(
            "stopped the embedded PostgreSQL"
            if stopped
            else "the embedded PostgreSQL was not running"
        )
    else:
        _print_status(embedded.status())
        if args.storage and not embedded.is_embedded_url(args.storage):
            print(f"note: --storage {mask_url(args.storage)} is not the embedded server: this "
                  "is the embedded one's status (psql or amt-search status for that server)")
    return 0


def _print_status(info: dict[str, Any]) -> None:
    if info["running"]:
        clients = ("not answering: stopped or busy?" if info["connections"] is None
                   else f"{info['connections']} client connections")
        print(f"embedded PostgreSQL: running (pid {info['pid']}, started {info['started_at']}, "
              f"{clients})")
        print(f"url:  {check_url(info['url'])}")
        print(f"psql: psql '{info['url']}'")
    else:
        print("embedded PostgreSQL: not running (it starts when a command needs it)")
    print(f"data: {info['data_dir']}")
    print(f"log:  {info['log']}")
    if os.environ.get(ENV_VAR):
        print(f"note: studies go to {mask_url(os.environ[ENV_VAR])} (from {ENV_VAR}), not here")
