"""Events of a source (``source show``): the agent's and the control plane's own."""

from __future__ import annotations

from typing import Any, List, Sequence

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row

_INSERT = "INSERT INTO events (source_id, time, level, code, message) VALUES (?, ?, ?, ?, ?)"


def add(conn: Conn, source_id: str, at: str, level: str, code: str, message: str) -> None:
    db.execute(conn, _INSERT, (source_id, at, level, code, message))


def add_many(conn: Conn, rows: Sequence[Sequence[Any]]) -> None:
    """Rows of (source_id, time, level, code, message)."""
    db.executemany(conn, _INSERT, rows)


def keep_latest(conn: Conn, source_id: str, keep: int) -> None:
    db.execute(
        conn,
        "DELETE FROM events WHERE source_id = ? AND id NOT IN (SELECT id FROM events "
        "WHERE source_id = ? ORDER BY id DESC LIMIT ?)",
        (source_id, source_id, keep),
    )


def latest(d: Db, source_id: str, n: int) -> List[Row]:
    return db.all(d, "SELECT time, level, code, message FROM events WHERE source_id = ? ORDER BY id DESC "
                  "LIMIT ?", (source_id, n))


def count_since(d: Db, source_id: str, code: str, since: str, message_prefix: str) -> int:
    """Events of ``code`` since ``since`` whose message starts with ``message_prefix``."""
    return db.count(
        d,
        "SELECT COUNT(*) AS n FROM events WHERE source_id = ? AND code = ? AND time >= ? AND message LIKE ?",
        (source_id, code, since, f"{message_prefix}%"),
    )
