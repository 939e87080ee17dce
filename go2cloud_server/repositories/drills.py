"""Drill runs and their reports."""

from __future__ import annotations

from typing import Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row


def insert(conn: Conn, drill_id: str, source_id: str, task_id: str, at: str) -> None:
    db.execute(conn, "INSERT INTO drills (id, source_id, task_id, status, created_at) "
               "VALUES (?, ?, ?, 'running', ?)", (drill_id, source_id, task_id, at))


def finish(conn: Conn, drill_id: str, status: str, report: str, at: str) -> None:
    """A running drill's end (nothing when it is not running any more)."""
    db.execute(conn, "UPDATE drills SET status = ?, report = ?, finished_at = ? WHERE id = ? AND status = "
               "'running'", (status, report, at, drill_id))


def cancel_running(conn: Conn, task_id: str, at: str) -> None:
    db.execute(conn, "UPDATE drills SET status = 'cancelled', finished_at = ? WHERE task_id = ? AND status = "
               "'running'", (at, task_id))


def count_interrupted(d: Db, task_id: str) -> int:
    return db.count(d, "SELECT COUNT(*) AS n FROM drills WHERE task_id = ? AND status = 'interrupted'",
                    (task_id,))


def latest_of_source(d: Db, source_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM drills WHERE source_id = ? ORDER BY created_at DESC, seq DESC LIMIT 1",
                  (source_id,))
