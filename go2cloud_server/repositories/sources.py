"""Sources (imported machines), their heartbeat, lease and clone warning."""

from __future__ import annotations

from typing import List, Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row


def get(d: Db, source_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM sources WHERE id = ?", (source_id,))


def count_active(d: Db, workgroup_id: str) -> int:
    return db.count(d, "SELECT COUNT(*) AS n FROM sources WHERE workgroup_id = ? AND state = 'active'",
                    (workgroup_id,))


def count_in_workgroup(d: Db, workgroup_id: str) -> int:
    return db.count(d, "SELECT COUNT(*) AS n FROM sources WHERE workgroup_id = ?", (workgroup_id,))


def list_all(d: Db, workgroup_id: Optional[str] = None) -> List[Row]:
    """In import order; those of one workgroup when given."""
    if workgroup_id:
        return db.all(d, "SELECT * FROM sources WHERE workgroup_id = ? ORDER BY imported_epoch, seq",
                      (workgroup_id,))
    return db.all(d, "SELECT * FROM sources ORDER BY imported_epoch, seq")


def ids_in_workgroup(d: Db, workgroup_id: str) -> List[str]:
    rows = db.all(d, "SELECT id FROM sources WHERE workgroup_id = ? ORDER BY imported_epoch, seq",
                  (workgroup_id,))
    return [r["id"] for r in rows]


def insert(conn: Conn, source_id: str, workgroup_id: str, public_key: str, hostname: str,
           machine_id: str, agent_version: str, inventory: str, token_id: str, imported_at: str,
           imported_epoch: float) -> None:
    db.execute(
        conn,
        "INSERT INTO sources (id, workgroup_id, public_key, hostname, machine_id, agent_version, "
        "inventory, token_id, imported_at, imported_epoch, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')",
        (source_id, workgroup_id, public_key, hostname, machine_id, agent_version, inventory, token_id,
         imported_at, imported_epoch),
    )


def mark_replaced(conn: Conn, source_id: str, by: str) -> None:
    db.execute(conn, "UPDATE sources SET state = 'replaced', replaced_by = ?, workgroup_id = NULL "
               "WHERE id = ?", (by, source_id))


def set_workgroup(conn: Conn, source_id: str, workgroup_id: Optional[str]) -> None:
    db.execute(conn, "UPDATE sources SET workgroup_id = ? WHERE id = ?", (workgroup_id, source_id))


def save_lease(conn: Conn, source_id: str, lease: str, epoch: int) -> None:
    db.execute(conn, "UPDATE sources SET lease = ?, lease_epoch = ? WHERE id = ?", (lease, epoch, source_id))


def set_clone_warning(conn: Conn, source_id: str, warning: str) -> None:
    db.execute(conn, "UPDATE sources SET clone_warning = ? WHERE id = ?", (warning, source_id))


def record_heartbeat(conn: Conn, source_id: str, epoch: float, at: str, heartbeat: str,
                     agent_version: Optional[str]) -> None:
    """The agent's latest heartbeat (``agent_version`` kept when None)."""
    db.execute(
        conn,
        "UPDATE sources SET last_seen_epoch = ?, last_seen_at = ?, heartbeat = ?, "
        "agent_version = COALESCE(?, agent_version) WHERE id = ?",
        (epoch, at, heartbeat, agent_version, source_id),
    )
