"""Migration tasks."""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row

#: the columns a new task is inserted with (``current_cycle`` starts at 1)
INSERT_COLUMNS = (
    "id", "source_id", "workgroup_id", "name", "description", "mode", "paths", "disks", "snapshot",
    "block_token", "bandwidth_mbps", "compression", "checksum", "sync_every_s", "keep_images", "status",
    "rsync_password", "created_at", "updated_at", "history", "bandwidth_schedule",
)
#: the columns :func:`update` may change
COLUMNS = frozenset(INSERT_COLUMNS) | {
    "current_cycle", "last_committed", "finalizing", "paused_from", "error_code", "error_message",
    "finished_at", "drill_command", "drill_override",
}


def _marks(values: Iterable[Any]) -> str:
    return ",".join("?" for _ in values)


def get(d: Db, task_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM tasks WHERE id = ?", (task_id,))


def exists(d: Db, task_id: str) -> bool:
    return db.one(d, "SELECT 1 AS x FROM tasks WHERE id = ?", (task_id,)) is not None


def of_source(d: Db, task_id: str, source_id: str) -> Optional[Row]:
    """Task ``task_id`` if it is one of source ``source_id``."""
    return db.one(d, "SELECT * FROM tasks WHERE id = ? AND source_id = ?", (task_id, source_id))


def latest_of_source(d: Db, source_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM tasks WHERE source_id = ? ORDER BY created_at DESC, seq DESC LIMIT 1",
                  (source_id,))


def latest_of_source_in(d: Db, source_id: str, statuses: Iterable[str]) -> Optional[Row]:
    """The source's latest task in one of ``statuses``."""
    statuses = tuple(statuses)
    return db.one(
        d,
        f"SELECT * FROM tasks WHERE source_id = ? AND status IN ({_marks(statuses)}) "  # noqa: S608
        "ORDER BY created_at DESC, seq DESC LIMIT 1",
        (source_id, *statuses),
    )


def all_of_source(d: Db, source_id: str) -> List[Row]:
    """Newest first."""
    return db.all(d, "SELECT * FROM tasks WHERE source_id = ? ORDER BY created_at DESC, seq DESC",
                  (source_id,))


def with_status(d: Db, statuses: Iterable[str]) -> List[Row]:
    statuses = tuple(statuses)
    return db.all(d, f"SELECT * FROM tasks WHERE status IN ({_marks(statuses)}) ORDER BY seq",  # noqa: S608
                  statuses)  # noqa: S608


def failed_with(d: Db, error_codes: Iterable[str]) -> List[Row]:
    codes = tuple(sorted(error_codes))
    return db.all(d, f"SELECT * FROM tasks WHERE status = 'failed' AND error_code IN ({_marks(codes)}) "  # noqa: S608
                  "ORDER BY seq", codes)


def auto_sync_candidates(d: Db) -> List[Row]:
    """Pending tasks with an automatic sync interval: id, interval and last committed cycle."""
    return db.all(d, "SELECT id, sync_every_s, last_committed FROM tasks WHERE status = 'pending' "
                  "AND finalizing = 0 AND sync_every_s IS NOT NULL ORDER BY seq")


def disks_and_inventory(d: Db, task_id: str) -> Optional[Row]:
    """The task's ``disks`` and its source's ``inventory``."""
    return db.one(d, "SELECT t.disks, s.inventory FROM tasks t LEFT JOIN sources s ON s.id = t.source_id "
                  "WHERE t.id = ?", (task_id,))


def cycle_and_epoch(d: Db, task_id: str) -> Optional[Row]:
    """The task's ``current_cycle``, its ``source_id`` and that source's ``lease_epoch``."""
    return db.one(d, "SELECT t.current_cycle, s.id AS source_id, s.lease_epoch FROM tasks t "
                  "JOIN sources s ON s.id = t.source_id WHERE t.id = ?", (task_id,))


def insert(conn: Conn, row: Mapping[str, Any]) -> None:
    """A new task (``row`` has every column of :data:`INSERT_COLUMNS`) at cycle 1."""
    cols = INSERT_COLUMNS[:16] + ("current_cycle",) + INSERT_COLUMNS[16:]
    values = [row[c] for c in INSERT_COLUMNS[:16]] + [1] + [row[c] for c in INSERT_COLUMNS[16:]]
    db.execute(conn, f"INSERT INTO tasks ({', '.join(cols)}) VALUES ({_marks(cols)})",  # noqa: S608
               values)


def status_and_history(conn: Conn, task_id: str) -> Optional[Row]:
    return db.one(conn, "SELECT status, history FROM tasks WHERE id = ?", (task_id,))


def update(conn: Conn, task_id: str, changes: Mapping[str, Any]) -> None:
    unknown = set(changes) - COLUMNS
    if unknown:
        raise ValueError(f"not columns of tasks: {sorted(unknown)}")
    cols = ", ".join(f"{k} = ?" for k in changes)
    db.execute(conn, f"UPDATE tasks SET {cols} WHERE id = ?", (*changes.values(), task_id))  # noqa: S608
