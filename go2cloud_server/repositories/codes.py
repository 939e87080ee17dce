"""Activation codes."""

from __future__ import annotations

from typing import List, Optional

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db, Row


def get(d: Db, token_id: str) -> Optional[Row]:
    return db.one(d, "SELECT * FROM codes WHERE token_id = ?", (token_id,))


def insert(conn: Conn, token_id: str, workgroup_id: str, salt: bytes, code_hash: bytes,
           uses: int, created_at: str, expires_at: str, expires_epoch: float) -> None:
    db.execute(
        conn,
        "INSERT INTO codes (token_id, workgroup_id, salt, code_hash, uses, uses_left, created_at, "
        "expires_at, expires_epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (token_id, workgroup_id, salt, code_hash, uses, uses, created_at, expires_at, expires_epoch),
    )


def list_all(d: Db, workgroup_id: Optional[str] = None) -> List[Row]:
    if workgroup_id:
        return db.all(d, "SELECT * FROM codes WHERE workgroup_id = ? ORDER BY created_at, seq",
                      (workgroup_id,))
    return db.all(d, "SELECT * FROM codes ORDER BY created_at, seq")


def revoke(conn: Conn, token_id: str, at: str) -> None:
    db.execute(conn, "UPDATE codes SET revoked_at = ? WHERE token_id = ?", (at, token_id))


def use_one(conn: Conn, token_id: str) -> None:
    db.execute(conn, "UPDATE codes SET uses_left = uses_left - 1 WHERE token_id = ?", (token_id,))
