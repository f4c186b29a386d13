"""A template process for the fault-injection tests: ``python -m tests.reliability.forkserver``.

Starting ``amt-search worker`` costs 2-10 s of imports (torch) on the shared CI cores, and the
kill test restarts workers twenty times and more. This process imports everything once and
then forks one child per request; each child is a separate OS process that runs
``search.cli.main(argv)`` exactly as the ``amt-search`` entry point does, with its own
session, environment and log file, and is stopped, killed and reaped for real.

Protocol, one JSON object per line: stdin ``{"argv": [...], "env": {...}, "log": PATH,
"target": "module:function"}`` (``search.cli:main``, or a helper of the tests);
stdout ``{"pid": N}`` for each request (in order) and ``{"exit": N, "rc": RC}`` when child N
ends (RC is -SIGNAL for a killed child).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from types import FrameType

import search.cli  # noqa: F401  (importing once is the point)
import search.worker  # noqa: F401
import trainer.loop  # noqa: F401
from search.launch import die_with_parent


def _emit(obj: dict[str, int]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())  # no Python-level lock: safe in a handler


def _reap(signum: int, frame: FrameType | None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _emit({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})


def _child(request: dict[str, object]) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()  # SIGTERM when this server dies (it dies with the test session)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(request["env"])  # type: ignore[arg-type]
    module, _, function = str(request["target"]).partition(":")
    try:
        rc = int(getattr(importlib.import_module(module), function)(request["argv"]) or 0)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main() -> None:
    signal.signal(signal.SIGCHLD, _reap)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _emit({"pid": pid})


if __name__ == "__main__":
    main()
