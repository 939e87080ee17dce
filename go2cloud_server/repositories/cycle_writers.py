"""The agent sessions (epochs) that wrote each cycle of a task (fencing)."""

from __future__ import annotations

from typing import List

from go2cloud_server.repositories import db
from go2cloud_server.repositories.db import Conn, Db


def add(conn: Conn, task_id: str, cycle: int, epoch: int, at: str) -> None:
    db.execute(conn, "INSERT INTO cycle_writers (task_id, cycle, epoch, first_at) "
               "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", (task_id, cycle, epoch, at))


def epochs(d: Db, task_id: str, cycle: int) -> List[int]:
    rows = db.all(d, "SELECT epoch FROM cycle_writers WHERE task_id = ? AND cycle = ? ORDER BY epoch",
                  (task_id, cycle))
    return [int(r["epoch"]) for r in rows]
