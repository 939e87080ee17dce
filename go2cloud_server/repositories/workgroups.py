"""Workgroups (and, on delete, their activation codes)."""

from __future__ import annotations

from typing import List, Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row


def find(d: Db, ref: str) -> Optional[Row]:
    """The workgroup whose id (first) or name is ``ref``."""
    return db.one(d, "SELECT * FROM workgroups WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
                  (ref, ref, ref))


def get(d: Db, wg_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM workgroups WHERE id = ?", (wg_id,))


def brief(d: Db, wg_id: str) -> Optional[Row]:
    """``{"id", "name"}`` of a workgroup."""
    return db.one(d, "SELECT id, name FROM workgroups WHERE id = ?", (wg_id,))


def count(d: Db) -> int:
    return db.count(d, "SELECT COUNT(*) AS n FROM workgroups")


def name_taken(d: Db, name: str) -> bool:
    return db.one(d, "SELECT 1 AS x FROM workgroups WHERE name = ?", (name,)) is not None


def insert(conn: Conn, wg_id: str, name: str, description: str, tags: str, at: str) -> None:
    db.execute(conn, "INSERT INTO workgroups (id, name, description, tags, created_at) "
               "VALUES (?, ?, ?, ?, ?)", (wg_id, name, description, tags, at))


def list_all(d: Db) -> List[Row]:
    return db.all(d, "SELECT * FROM workgroups ORDER BY created_at, name")


def delete(conn: Conn, wg_id: str) -> None:
    """The workgroup and its activation codes."""
    db.execute(conn, "DELETE FROM codes WHERE workgroup_id = ?", (wg_id,))
    db.execute(conn, "DELETE FROM workgroups WHERE id = ?", (wg_id,))
