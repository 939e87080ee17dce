"""Where a repository statement runs: the three functions every repository calls."""

from __future__ import annotations

import sqlite3
from typing import Any, Dict, List, Optional, Sequence, Union

from go2cloud_server.store import Store

#: the connection of an open transaction (what ``Store.transaction()`` yields)
Conn = sqlite3.Connection
#: a read outside a transaction (the ``Store``) or any statement inside one (its connection)
Db = Union[Store, Conn]
#: what a failed statement raises
DbError = sqlite3.Error
Row = Dict[str, Any]


def one(db: Db, sql: str, args: Sequence[Any] = ()) -> Optional[Row]:
    if isinstance(db, Store):
        return db.one(sql, args)
    return Store.q_one(db, sql, args)


def all(db: Db, sql: str, args: Sequence[Any] = ()) -> List[Row]:  # noqa: A001 - the repositories' verb
    if isinstance(db, Store):
        return db.all(sql, args)
    return Store.q_all(db, sql, args)


def execute(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> int:
    """A write inside a transaction; the number of rows it changed."""
    return conn.execute(sql, args).rowcount


def executemany(conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    conn.executemany(sql, rows)


def count(db: Db, sql: str, args: Sequence[Any] = ()) -> int:
    """The first column of the first row of a ``SELECT COUNT(*) AS n ...``."""
    row = one(db, sql, args)
    return int(row["n"]) if row else 0
