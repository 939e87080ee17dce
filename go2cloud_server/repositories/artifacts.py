"""Artifacts: the committed cycles of a task (one row per cycle and disk; disk '' for a file task)."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Set

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row


def upsert(conn: Conn, task_id: str, cycle: Optional[int], row: Mapping[str, Any]) -> None:
    db.execute(
        conn,
        "INSERT INTO artifacts (task_id, cycle, disk, path, bytes, files, created_at, sha256, report) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, cycle, disk) DO UPDATE SET "
        "path = excluded.path, bytes = excluded.bytes, files = excluded.files, "
        "created_at = excluded.created_at, sha256 = excluded.sha256, report = excluded.report",
        (task_id, cycle, row["disk"], row["path"], row["bytes"], row["files"], row["created_at"],
         row["sha256"], row["report"]),
    )


def delete_cycle(conn: Conn, task_id: str, cycle: int) -> None:
    db.execute(conn, "DELETE FROM artifacts WHERE task_id = ? AND cycle = ?", (task_id, cycle))


def of_task(d: Db, task_id: str) -> List[Row]:
    return db.all(d, "SELECT cycle, disk, path, created_at, bytes, files, sha256, report FROM artifacts "
                  "WHERE task_id = ? ORDER BY cycle, disk", (task_id,))


def committed_cycles(d: Db, task_id: str) -> Set[int]:
    return {int(r["cycle"]) for r in db.all(d, "SELECT DISTINCT cycle FROM artifacts WHERE task_id = ?",
                                            (task_id,))}


def generation(d: Db, task_id: str, cycle: int, disk: str) -> Optional[Row]:
    """``disk`` and ``report`` of one block generation's row."""
    return db.one(d, "SELECT disk, report FROM artifacts WHERE task_id = ? AND cycle = ? AND disk = ?",
                  (task_id, cycle, disk))


def set_report(conn: Conn, task_id: str, cycle: int, disk: str, report: str) -> None:
    db.execute(conn, "UPDATE artifacts SET report = ? WHERE task_id = ? AND cycle = ? AND disk = ?",
               (report, task_id, cycle, disk))


def refuse_verification(conn: Conn, task_id: str, cycle: int, disk: str, report: str) -> None:
    db.execute(conn, "UPDATE artifacts SET sha256 = NULL, report = ? WHERE task_id = ? AND cycle = ? "
               "AND disk = ?", (report, task_id, cycle, disk))


def set_verified(conn: Conn, task_id: str, cycle: int, disk: str, nbytes: int,
                 sha256: Optional[str], report: str) -> None:
    db.execute(conn, "UPDATE artifacts SET bytes = ?, sha256 = ?, report = ? WHERE task_id = ? AND cycle = ? "
               "AND disk = ?", (nbytes, sha256, report, task_id, cycle, disk))


def set_path(conn: Conn, task_id: str, cycle: int, disk: str, path: str, report: str) -> None:
    """A block generation's files moved (a delta folded into a full image by retention)."""
    db.execute(conn, "UPDATE artifacts SET path = ?, report = ? WHERE task_id = ? AND cycle = ? AND disk = ?",
               (path, report, task_id, cycle, disk))


def unverified_generations(d: Db) -> List[Row]:
    """Block generations without a sha256 (pending or failed verification)."""
    return db.all(d, "SELECT task_id, cycle, disk, report FROM artifacts WHERE disk != '' AND sha256 IS NULL "
                  "ORDER BY task_id, cycle, disk")
