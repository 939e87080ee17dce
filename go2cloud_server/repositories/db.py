"""Where a repository statement runs: the functions every repository calls.

A statement is written once, in the SQL both engines understand (``INSERT ... ON CONFLICT``,
ordering by explicit columns, ``?`` placeholders); the database it runs on
(:class:`~go2cloud_server.store.Database`: SQLite or PostgreSQL) turns the placeholders into its
driver's style. Inside a transaction the repositories get a :class:`Conn`: the connection and
the database it belongs to.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from go2cloud_server.store import Database, DatabaseError

if TYPE_CHECKING:
    from go2cloud_server.pgstore import PgConnection

#: the connection of an open transaction (what ``Database.transaction()`` yields)
Conn = Union[sqlite3.Connection, "PgConnection"]
#: a read outside a transaction (the ``Database``) or any statement inside one (its connection)
Db = Union[Database, Conn]
#: what a failed statement raises (SQLite's own errors; PostgreSQL's as DatabaseError)
DbError = (sqlite3.Error, DatabaseError)
Row = Dict[str, Any]


def _run(conn: Conn, sql: str, args: Sequence[Any]) -> Any:
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(sql, args)
    return conn.store.run(conn, sql, args)


def one(db: Db, sql: str, args: Sequence[Any] = ()) -> Optional[Row]:
    if isinstance(db, Database):
        return db.one(sql, args)
    row = _run(db, sql, args).fetchone()
    return dict(row) if row is not None else None


def all(db: Db, sql: str, args: Sequence[Any] = ()) -> List[Row]:  # noqa: A001 - the repositories' verb
    if isinstance(db, Database):
        return db.all(sql, args)
    return [dict(r) for r in _run(db, sql, args).fetchall()]


def execute(conn: Conn, sql: str, args: Sequence[Any] = ()) -> int:
    """A write inside a transaction; the number of rows it changed."""
    return int(_run(conn, sql, args).rowcount)


def executemany(conn: Conn, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.executemany(sql, rows)
    else:
        conn.store.run_many(conn, sql, rows)


def count(db: Db, sql: str, args: Sequence[Any] = ()) -> int:
    """The first column of the first row of a ``SELECT COUNT(*) AS n ...``."""
    row = one(db, sql, args)
    return int(row["n"]) if row else 0


def notify(conn: Conn, channel: str, payload: str) -> None:
    """Wake the listeners of ``channel`` in every replica when the transaction commits."""
    if not isinstance(conn, sqlite3.Connection):  # one process on SQLite: woken in the process
        conn.store.notify(conn, channel, payload)
