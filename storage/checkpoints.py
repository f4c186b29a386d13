"""Checkpoints that survive kills and full disks, and are verified before every load.

A run directory holds ``ckpt_<step>.pt`` files and ``manifest.json``, which lists each kept
checkpoint (file, step, size, SHA-256), newest last. Writes are atomic: a temporary file in
the same directory, fsync, rename, fsync of the directory; the manifest is written the same
way, after the checkpoint it lists. A kill or a full disk at any point leaves the previous
checkpoints and the previous manifest as they were. Loading checks size and SHA-256 against
the manifest, then ``torch.load(weights_only=True)``: a truncated or tampered file, or one
the manifest does not list, is refused with CheckpointError naming the file.

A kill between the rename and the manifest write can leave one ``ckpt_*.pt`` that the
manifest does not list: it is never loaded, and saving that step again replaces it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, cast

import torch

from storage.errors import CheckpointError, os_error_in
from storage.files import atomic_write

MANIFEST = "manifest.json"
_LOCK = ".manifest.lock"
_TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointCheck:
    """One manifest entry as ``verify`` found it; ``problem`` is empty when it verifies."""

    path: Path
    step: int
    problem: str

    @property
    def ok(self) -> bool:
        return not self.problem


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:09d}.pt"


def save_checkpoint(run_dir: Path | str, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint for ``step`` and keep the newest ``keep`` (>= 2).

    Atomic: until it returns, the previous checkpoints and manifest are untouched. On failure
    (e.g. disk full) it removes what it wrote and raises CheckpointError, the OSError chained.
    Saving a step that is already listed replaces that checkpoint.
    """
    if keep < 2:
        raise ValueError(f"keep must be >= 2 (the newest may be half-written), got {keep}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / checkpoint_name(step)
    with _manifest_lock(run_dir):
        _remove_dead_temps(run_dir)
        entries = [e for e in _read_manifest(run_dir) if e["file"] != path.name]
        digest = hashlib.sha256()  # hashed as it is written: a 1.5 GB checkpoint is not read back
        try:
            atomic_write(path, lambda f: torch.save(state, cast(IO[bytes], _Hashing(f, digest))))
        except Exception as e:  # torch reports a failed write (ENOSPC) as a RuntimeError
            raise _write_failed(path, e) from e
        entry = {
            "file": path.name,
            "step": step,
            "size": path.stat().st_size,
            "sha256": digest.hexdigest(),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            _commit(run_dir, [*entries, entry], keep)
        except Exception as e:
            path.unlink(missing_ok=True)
            raise _write_failed(path, e) from e
    return path


def keep_newest(run_dir: Path | str, keep: int = 1) -> None:
    """Delete all but the newest ``keep`` listed checkpoints (a finished run that will not
    resume needs only its last). The manifest is rewritten first, atomically, so a kill in
    between leaves unlisted files, never a manifest that lists a missing one."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).exists():
        return
    with _manifest_lock(run_dir):
        _remove_dead_temps(run_dir)  # a killed earlier attempt's half-written checkpoint
        entries = _read_manifest(run_dir)
        if len(entries) > keep:
            _commit(run_dir, entries, keep)


def _commit(run_dir: Path, entries: list[dict[str, Any]], keep: int) -> None:
    """Write the manifest listing the newest ``keep`` of ``entries`` (atomically), then delete
    the files of the others: a kill in between leaves unlisted files, never a listed one
    missing. Called under the manifest lock."""
    kept, dropped = entries[-keep:], entries[:-keep]
    manifest = json.dumps({"version": 1, "checkpoints": kept}, indent=2) + "\n"
    atomic_write(run_dir / MANIFEST, lambda f: f.write(manifest.encode()))
    for old in dropped:
        (run_dir / old["file"]).unlink(missing_ok=True)


def load_checkpoint(path: Path | str, map_location: str | None = "cpu") -> dict[str, Any]:
    """Verify ``path`` against its run directory's manifest, then load it (weights only).

    Raises CheckpointError naming the file when it is missing, not in the manifest, has the
    wrong size or SHA-256, or holds objects that ``weights_only`` loading refuses.
    """
    path = Path(path)
    problem = _check(path, _entry_for(path))
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem} — use another checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        what = ("holds objects that weights-only loading refuses" if zipped
                else "is not a PyTorch checkpoint (no zip archive: damaged when written?)")
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} {what} ({first}) — use another checkpoint, or move the run "
            "directory away to start afresh") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest checkpoint in the manifest that verifies, or None when there is none.

    A newer checkpoint that fails verification is skipped with a warning. Raises
    CheckpointError when the manifest exists but cannot be read.
    """
    run_dir = Path(run_dir)
    for entry in reversed(_read_manifest(run_dir)):
        path = run_dir / entry["file"]
        problem = _check(path, entry)
        if not problem:
            return path
        _log.warning("skipping checkpoint %s: it %s", path, problem)
    return None


def verify(run_dir: Path | str) -> list[CheckpointCheck]:
    """Every checkpoint the manifest lists, oldest first, with what is wrong with it if any.

    Raises CheckpointError when the manifest exists but cannot be read.
    """
    run_dir = Path(run_dir)
    return [
        CheckpointCheck(run_dir / e["file"], int(e["step"]), _check(run_dir / e["file"], e))
        for e in _read_manifest(run_dir)
    ]


def checkpoint_sha256(path: Path | str) -> str | None:
    """The SHA-256 the manifest lists for ``path`` (None when unlisted), without reading it."""
    entry = _entry_for(Path(path))
    return str(entry["sha256"]) if entry else None


class _Hashing:
    """A write-only file that feeds what passes through it to ``digest``."""

    def __init__(self, f: IO[bytes], digest: Any) -> None:
        self.f, self.digest = f, digest

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_failed(path: Path, error: BaseException) -> CheckpointError:
    cause = os_error_in(error)
    if cause is not None:
        reason = cause.strerror or str(cause)
        hint = "free disk space" if cause.errno == errno.ENOSPC else "check the run directory"
    else:
        reason, hint = str(error).strip().splitlines()[0], "check what the state holds"
    return CheckpointError(
        f"cannot write checkpoint {path}: {reason} — {hint}; the previous checkpoints are intact"
    )


def _check(path: Path, entry: dict[str, Any] | None) -> str:
    """'' when ``path`` matches its manifest ``entry``, else what is wrong, as a verb phrase."""
    if entry is None:
        return f"is not listed in {path.parent / MANIFEST}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != entry["size"]:
        return f"is truncated or altered ({size} bytes, the manifest says {entry['size']})"
    if sha256_file(path) != entry["sha256"]:
        return "does not match its SHA-256 in the manifest (corrupt or tampered)"
    return ""


def _entry_for(path: Path) -> dict[str, Any] | None:
    return next((e for e in _read_manifest(path.parent) if e["file"] == path.name), None)


def _read_manifest(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / MANIFEST
    try:
        entries = json.loads(path.read_text())["checkpoints"]
        types = {"file": str, "step": int, "size": int, "sha256": str}
        for e in entries:
            if not isinstance(e, dict) or not types.keys() <= set(e):
                raise ValueError("an entry lacks file, step, size or sha256")
            bad = [k for k, t in types.items() if not isinstance(e[k], t)
                   or isinstance(e[k], bool)]
            if bad:
                raise ValueError(f"an entry's {bad[0]} is {e[bad[0]]!r}")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable ({e})") from e
    return list(entries)


def _remove_dead_temps(run_dir: Path) -> None:
    """Remove temporary files left by writers that were killed (their pid is gone)."""
    for candidate in run_dir.glob(".*.tmp"):
        match = _TMP_PATTERN.match(candidate.name)
        if match and not _pid_alive(int(match["pid"])):
            candidate.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _manifest_lock(run_dir: Path) -> Iterator[None]:
    """Serialise savers of one run directory (e.g. a retried trial and a straggler)."""
    with open(run_dir / _LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
