"""Commands queued for agents and their acknowledgements."""

from __future__ import annotations

from typing import List, Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row

#: the notification channel of queued commands (payload: the source id)
COMMANDS_CHANNEL = "go2cloud_commands"


def insert(conn: Conn, command_id: str, source_id: str, task_id: Optional[str], ctype: str,
           params: str, at: str) -> None:
    db.execute(
        conn,
        "INSERT INTO commands (id, source_id, task_id, type, params, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (command_id, source_id, task_id, ctype, params, at, at),
    )
    # the long polls of every replica look again when this commits (the queueing replica's own
    # are woken in-process too: ``Commands.notify``)
    db.notify(conn, COMMANDS_CHANNEL, source_id)


def get_of_source(d: Db, command_id: str, source_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM commands WHERE id = ? AND source_id = ?", (command_id, source_id))


def supersede_queued(conn: Conn, task_id: str, at: str) -> None:
    """Every command of the task still queued (not yet fetched) is superseded."""
    db.execute(conn, "UPDATE commands SET status = 'superseded', updated_at = ? WHERE task_id = ? "
               "AND status = 'queued'", (at, task_id))


def supersede_if_queued(conn: Conn, command_id: str, at: str) -> None:
    db.execute(conn, "UPDATE commands SET status = 'superseded', updated_at = ? WHERE id = ? AND status = "
               "'queued'", (at, command_id))


def acknowledge(conn: Conn, command_id: str, status: str, error_code: Optional[str],
                message: Optional[str], result: str, at: str, applied: bool) -> None:
    db.execute(
        conn,
        "UPDATE commands SET status = ?, error_code = ?, message = ?, result = ?, updated_at = ?, "
        "applied = ? WHERE id = ?",
        (status, error_code, message, result, at, int(applied), command_id),
    )


def is_applied(d: Db, command_id: str) -> Optional[bool]:
    """Whether the command's final acknowledgement was applied (None: no such command)."""
    row = db.one(d, "SELECT applied FROM commands WHERE id = ?", (command_id,))
    return None if row is None else bool(row["applied"])


def mark_applied(conn: Conn, command_id: str) -> None:
    db.execute(conn, "UPDATE commands SET applied = 1 WHERE id = ?", (command_id,))


def unapplied(d: Db) -> List[Row]:
    return db.all(d, "SELECT * FROM commands WHERE applied = 0 ORDER BY created_at, seq")


def pending(d: Db, source_id: str) -> List[Row]:
    """What the agent has to do (queued or accepted), in queue order."""
    return db.all(d, "SELECT id, type, params, created_at FROM commands WHERE source_id = ? "
                  "AND status IN ('queued','accepted') ORDER BY seq", (source_id,))


def any_pending(d: Db, source_id: str) -> bool:
    return db.one(d, "SELECT 1 AS x FROM commands WHERE source_id = ? AND status IN ('queued','accepted') "
                  "LIMIT 1", (source_id,)) is not None


def newer_cycle_command(d: Db, task_id: str, command_id: str) -> bool:
    """Whether a cycle command of the task was queued after ``command_id``."""
    return db.one(
        d,
        "SELECT 1 AS x FROM commands WHERE task_id = ? AND type IN ('start','sync','finalize') "
        "AND seq > (SELECT seq FROM commands WHERE id = ?) LIMIT 1",
        (task_id, command_id),
    ) is not None
