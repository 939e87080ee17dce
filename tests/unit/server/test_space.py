"""The database's reserve (go2cloud_server/space.py): allocated, released on a full target,
data writes refused until it is back; and what counts as "the disk is full"."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from go2cloud_server import space


def test_reserve_is_allocated_released_and_taken_back(tmp_path: Path) -> None:
    guard = space.SpaceGuard(tmp_path / "data", tmp_path / "images", reserve_bytes=space.MiB)
    (tmp_path / "data").mkdir()
    assert guard.shared and guard.reserve_bytes == space.MiB
    assert guard.ensure() and guard.held
    assert guard.reserve_path.stat().st_size == space.MiB
    assert guard.reserve_path.stat().st_blocks * 512 >= space.MiB  # real blocks, not a hole
    assert guard.release("test") is True
    assert not guard.reserve_path.exists() and not guard.held
    assert guard.release("again") is False
    # the temp directory has room: the reserve comes back when data writes ask
    assert guard.refusal() is None and guard.held and guard.reserve_path.exists()


def test_data_writes_are_refused_while_the_reserve_cannot_come_back(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    free = space.usage(tmp_path).free
    # a reserve larger than the filesystem's free space can never be allocated again
    guard = space.SpaceGuard(tmp_path / "data", tmp_path, reserve_bytes=free * 2)
    assert not guard.ensure()
    why = guard.refusal()
    assert why is not None and "the target is full" in why and "free of" in why


def test_no_reserve_on_separate_filesystems(tmp_path: Path) -> None:
    guard = space.SpaceGuard(tmp_path, Path("/proc"), reserve_bytes=space.MiB)
    assert not guard.shared and guard.reserve_bytes == 0 and guard.held
    assert guard.refusal() is None and not guard.reserve_path.exists()


def test_what_counts_as_disk_full() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    assert space.is_disk_full(full)
    try:  # SQLite rolled back on its own; the ROLLBACK that follows fails, hiding the first error
        try:
            raise full
        except sqlite3.OperationalError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None
    except sqlite3.OperationalError as exc:
        exc.__context__ = full
        assert space.is_disk_full(exc)
    assert space.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not space.is_disk_full(OSError(errno.EIO, "I/O error"))
    assert not space.is_disk_full(sqlite3.OperationalError("database is locked"))
