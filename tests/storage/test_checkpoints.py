"""Checkpoints: atomic writes, keep >= 2, SHA-256 verified loads, and a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from storage import CheckpointError
from storage import checkpoints as ck


def state(step: int, size: int = 64) -> dict[str, Any]:
    return {"step": step, "model": {"w": torch.full((size,), float(step))}, "note": "ok"}


def saved(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


def test_save_load_roundtrip_and_manifest(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 100, state(100))
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 100 and torch.equal(loaded["model"]["w"], state(100)["model"]["w"])
    manifest = json.loads((tmp_path / ck.MANIFEST).read_text())["checkpoints"]
    assert manifest[0]["file"] == path.name and manifest[0]["step"] == 100
    assert manifest[0]["sha256"] == ck.sha256_file(path)
    assert manifest[0]["size"] == path.stat().st_size


def test_keeps_the_newest_two(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, state(step))
    assert saved(tmp_path) == [".manifest.lock", "ckpt_000000003.pt", "ckpt_000000004.pt",
                               "manifest.json"]  # fmt: skip
    assert [c.step for c in ck.verify(tmp_path)] == [3, 4]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000000004.pt"
    with pytest.raises(ValueError, match="keep must be >= 2"):
        ck.save_checkpoint(tmp_path, 5, state(5), keep=1)


def test_keep_newest_drops_the_older_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, state(step))
    ck.keep_newest(tmp_path, 1)  # what a complete search trial keeps
    assert saved(tmp_path) == [".manifest.lock", "ckpt_000000002.pt", "manifest.json"]
    assert [c.ok for c in ck.verify(tmp_path)] == [True]
    assert ck.checkpoint_sha256(tmp_path / "ckpt_000000002.pt") == ck.sha256_file(
        tmp_path / "ckpt_000000002.pt")
    ck.keep_newest(tmp_path / "elsewhere", 1)  # no manifest: nothing to do


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, "truncated"),
        (_flip_a_byte, "does not match its SHA-256"),
        (Path.unlink, "is missing"),
    ],
)
def test_damaged_checkpoint_is_refused_and_skipped(
    tmp_path: Path, damage: Any, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    ck.save_checkpoint(tmp_path, 1, state(1))
    newest = ck.save_checkpoint(tmp_path, 2, state(2))
    damage(newest)
    with pytest.raises(CheckpointError) as caught:
        ck.load_checkpoint(newest)
    assert problem in str(caught.value) and str(newest) in str(caught.value)
    with caplog.at_level(logging.WARNING):
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000000001.pt"
    assert "skipping checkpoint" in caplog.text
    assert [c.ok for c in ck.verify(tmp_path)] == [True, False]


def test_file_not_in_manifest_is_refused(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 1, state(1))
    stray = tmp_path / "ckpt_000000009.pt"
    torch.save(state(9), stray)
    with pytest.raises(CheckpointError, match="is not listed in"):
        ck.load_checkpoint(stray)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 1, {"obj": ck.CheckpointCheck(tmp_path, 1, "")})
    with pytest.raises(CheckpointError, match="holds objects that weights-only loading refuses"):
        ck.load_checkpoint(path)


def test_garbage_that_matches_its_manifest_is_named_so(tmp_path: Path) -> None:
    import hashlib
    import json

    path = ck.save_checkpoint(tmp_path, 1, state(1))
    garbage = b"not a checkpoint at all" * 10
    path.write_bytes(garbage)
    manifest = json.loads((tmp_path / ck.MANIFEST).read_text())
    manifest["checkpoints"][0].update(size=len(garbage),
                                      sha256=hashlib.sha256(garbage).hexdigest())
    (tmp_path / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path)
    assert "is not a PyTorch checkpoint (no zip archive" in str(e.value)
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice does not apply


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert ck.latest_checkpoint(tmp_path) is None
    (tmp_path / ck.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest .* is unreadable"):
        ck.verify(tmp_path)


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, like a filling disk."""

    def __init__(self, f: Any, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.f.write(data[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return int(self.f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


@pytest.mark.parametrize("failing", ["checkpoint", "manifest"])
def test_disk_full_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    good = ck.save_checkpoint(tmp_path, 1, state(1))
    before = saved(tmp_path)
    real_fdopen = os.fdopen
    opened: list[Any] = []
    fail_on, room = (1, 4096) if failing == "checkpoint" else (2, 16)  # manifest: 2nd write

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        opened.append(real_fdopen(fd, *args, **kwargs))
        return _FullDisk(opened[-1], room) if len(opened) == fail_on else opened[-1]

    monkeypatch.setattr(ck.os, "fdopen", fdopen)
    with pytest.raises(CheckpointError, match="No space left on device — free disk space"):
        ck.save_checkpoint(tmp_path, 2, state(2, size=100_000))
    monkeypatch.undo()
    assert saved(tmp_path) == before  # no temporary file, no half checkpoint
    assert ck.latest_checkpoint(tmp_path) == good
    assert ck.load_checkpoint(good)["step"] == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk(tiny_disk: Path) -> None:
    good = ck.save_checkpoint(tiny_disk, 1, state(1))
    with pytest.raises(CheckpointError, match="No space left on device"):
        ck.save_checkpoint(tiny_disk, 2, state(2, size=200_000))  # 800 kB on a 256 kB disk
    assert saved(tiny_disk) == [".manifest.lock", good.name, "manifest.json"]
    assert ck.load_checkpoint(good)["step"] == 1


def test_atomic_writes_get_the_umask_s_permissions(tmp_path: Path) -> None:
    from storage.files import _UMASK, atomic_write

    atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~_UMASK  # not mkstemp's 0600
    atomic_write(tmp_path / "b", lambda f: f.write(b"x"), mode=0o600)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600
