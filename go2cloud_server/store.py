"""The state of the control plane: one database, SQLite (embedded, the default) or PostgreSQL.

:class:`Database` is what the rest of the server uses: a pool of at most ``pool_size``
connections (a thread takes one for a query or a transaction and gives it back; a nested use in
the same thread gets the same one), ``transaction()`` for every write, ``one``/``all`` for reads,
``migrate()`` at start. Two engines implement it:

* :class:`Store`: SQLite, one file (``<data-dir>/server.db``) in WAL mode. A connection costs 2
  file descriptors (the database and its WAL) and its page cache, so the server's are bounded by
  the pool, never by its threads or the connections it serves. Writers serialise with ``BEGIN
  IMMEDIATE``, so a read-check-write sequence (consuming one use of an activation code) is atomic
  across threads and processes.
* ``go2cloud_server.pgstore.PgStore``: PostgreSQL (``serve --database postgresql://...``), for
  several replicas of ``serve`` on one database. Every write transaction first takes one
  transaction-level advisory lock, the same guarantee as SQLite's ``BEGIN IMMEDIATE`` across
  every replica; reads run in parallel. psycopg is imported only when such a database is opened.

A thread that finds every connection busy for ``busy_timeout_s`` gets
:class:`~go2cloud_server.errors.Busy` (503).

The schema is one definition for both engines: the migrations below, written in SQLite's
words, each applied once in order and recorded in ``meta.schema_version``; :func:`ddl` writes a
statement in PostgreSQL's types (64-bit integers, double precision, bytea, identity columns).
A migration that must differ per engine gives one text per engine. :meth:`Database.migrate`
brings an older database up to date (in one transaction) and refuses a newer one.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from go2cloud_server.errors import Busy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 7
#: database connections at most (readers run in parallel; writers take turns anyway)
POOL_SIZE = 8
SQLITE = "sqlite"
POSTGRESQL = "postgresql"

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workgroups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS codes (
    token_id TEXT PRIMARY KEY,
    workgroup_id TEXT NOT NULL,
    salt BLOB NOT NULL,
    code_hash BLOB NOT NULL,
    uses INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    expires_epoch REAL NOT NULL,
    revoked_at TEXT
);
CREATE INDEX IF NOT EXISTS codes_wg ON codes (workgroup_id);
CREATE TABLE IF NOT EXISTS sources (
    id TEXT PRIMARY KEY,
    workgroup_id TEXT,
    public_key TEXT NOT NULL,
    hostname TEXT NOT NULL DEFAULT '',
    machine_id TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    inventory TEXT NOT NULL DEFAULT '{}',
    token_id TEXT,
    imported_at TEXT NOT NULL,
    imported_epoch REAL NOT NULL,
    last_seen_epoch REAL,
    last_seen_at TEXT,
    heartbeat TEXT,
    state TEXT NOT NULL DEFAULT 'active',
    replaced_by TEXT
);
CREATE INDEX IF NOT EXISTS sources_wg ON sources (workgroup_id);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    workgroup_id TEXT,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'file',
    paths TEXT NOT NULL,
    bandwidth_mbps INTEGER NOT NULL,
    compression INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    sync_every_s INTEGER,
    keep_images INTEGER NOT NULL,
    status TEXT NOT NULL,
    paused_from TEXT,
    finalizing INTEGER NOT NULL DEFAULT 0,
    current_cycle INTEGER,
    last_committed INTEGER,
    rsync_password TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS tasks_source ON tasks (source_id);
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    source_id TEXT NOT NULL,
    task_id TEXT,
    type TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    error_code TEXT,
    message TEXT,
    result TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_source ON commands (source_id, status);
CREATE TABLE IF NOT EXISTS artifacts (
    task_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    files INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (task_id, cycle)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id TEXT NOT NULL,
    time TEXT NOT NULL,
    level TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_source ON events (source_id, id);
"""

# v2: block-level tasks (disks, snapshot backend, per-task receiver token) and one artifact row
# per disk of a cycle (the primary key gains ``disk``; file-mode rows keep ``disk = ''``).
_SCHEMA_V2 = """
ALTER TABLE tasks ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE tasks ADD COLUMN snapshot TEXT;
ALTER TABLE tasks ADD COLUMN block_token TEXT;
CREATE TABLE artifacts_v2 (
    task_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    disk TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    files INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    sha256 TEXT,
    report TEXT,
    PRIMARY KEY (task_id, cycle, disk)
);
INSERT INTO artifacts_v2 (task_id, cycle, disk, path, bytes, files, created_at)
    SELECT task_id, cycle, '', path, bytes, files, created_at FROM artifacts;
DROP TABLE artifacts;
ALTER TABLE artifacts_v2 RENAME TO artifacts
"""

# v3: the drill. One row per drill run (the ``drill`` command's id) with its report; the task
# knows its current drill command, the operator's override (who / when) and its status history.
_SCHEMA_V3 = """
ALTER TABLE tasks ADD COLUMN drill_command TEXT;
ALTER TABLE tasks ADD COLUMN drill_override TEXT;
ALTER TABLE tasks ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
CREATE TABLE drills (
    id TEXT PRIMARY KEY,
    source_id TEXT NOT NULL,
    task_id TEXT,
    status TEXT NOT NULL,
    report TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX drills_source ON drills (source_id, created_at)
"""

# v4: a final acknowledgement is applied (cycle committed, artifacts recorded, task moved on) after
# the transaction that stores it; ``applied = 0`` marks one whose application has not finished, so a
# retried acknowledgement or the next server start applies it (a crash in between loses nothing).
_SCHEMA_V4 = """
ALTER TABLE commands ADD COLUMN applied INTEGER NOT NULL DEFAULT 1
"""

# v5: fencing (go2cloud_server.lease). The source's lease (one live agent session at a time), the
# fingerprint of the machine it was imported from, the clone warning the operator sees, and which
# lease epochs wrote into each cycle (a cycle written by two sessions is never marked verified).
_SCHEMA_V5 = """
ALTER TABLE sources ADD COLUMN lease TEXT;
ALTER TABLE sources ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sources ADD COLUMN clone_warning TEXT;
CREATE TABLE cycle_writers (
    task_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    first_at TEXT NOT NULL,
    PRIMARY KEY (task_id, cycle, epoch)
)
"""

# v6: bandwidth windows (rules.bandwidth_schedule, normalised; NULL: the task's limit always)
_SCHEMA_V6 = """
ALTER TABLE tasks ADD COLUMN bandwidth_schedule TEXT
"""

# v7: insertion order as a column (``seq``) on the tables whose lists and "latest" relied on
# SQLite's rowid (tasks, drills, sources, codes), so that both engines order by explicit columns.
# Existing rows keep their rowid order; SQLite numbers new rows with a trigger (an ALTER TABLE
# cannot add an autoincrement column), PostgreSQL with an identity column.
_SEQ_TABLES = ("tasks", "drills", "sources", "codes")
_SCHEMA_V7_SQLITE = [
    stmt
    for table in _SEQ_TABLES
    for stmt in (
        f"ALTER TABLE {table} ADD COLUMN seq INTEGER",
        f"UPDATE {table} SET seq = rowid",
        f"CREATE INDEX {table}_seq ON {table} (seq)",
        f"CREATE TRIGGER {table}_seq_number AFTER INSERT ON {table} FOR EACH ROW WHEN NEW.seq IS NULL BEGIN "
        f"UPDATE {table} SET seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}) WHERE rowid = NEW.rowid; "
        "END",
    )
]
_SCHEMA_V7_POSTGRESQL = [
    stmt
    for table in _SEQ_TABLES
    for stmt in (
        f"ALTER TABLE {table} ADD COLUMN seq BIGINT GENERATED BY DEFAULT AS IDENTITY",
        f"CREATE INDEX {table}_seq ON {table} (seq)",
    )
]

#: the migrations: one text for both engines (statements separated by ``;``), or one list of
#: statements per engine
Migration = Union[str, Dict[str, List[str]]]
_MIGRATIONS: Dict[int, Migration] = {
    1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5, 6: _SCHEMA_V6,
    7: {SQLITE: _SCHEMA_V7_SQLITE, POSTGRESQL: _SCHEMA_V7_POSTGRESQL},
}

_PG_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def ddl(stmt: str, dialect: str) -> str:
    """A schema statement in ``dialect``'s words (SQLite's are the definition)."""
    if dialect == SQLITE:
        return stmt
    for pattern, replacement in _PG_TYPES:
        stmt = pattern.sub(replacement, stmt)
    return stmt


def migration_statements(version: int, dialect: str) -> List[str]:
    """The statements that bring a database of ``version - 1`` to ``version``."""
    mig = _MIGRATIONS[version]
    if isinstance(mig, str):
        return [ddl(stmt, dialect) for stmt in mig.split(";") if stmt.strip()]
    return list(mig[dialect])


class SchemaTooNew(RuntimeError):
    pass


class DatabaseError(Exception):
    """A statement failed on an engine other than SQLite (which raises ``sqlite3.Error``): the
    engine's own error is its ``__cause__``."""


class Database(abc.ABC):
    """The pool and the interface every engine implements (see the module docstring). An engine
    implements the abstract hooks below (SQLite: :class:`Store`; PostgreSQL: ``pgstore.PgStore``)."""

    dialect = ""

    def __init__(self, busy_timeout_s: float = 30.0, pool_size: int = POOL_SIZE) -> None:
        self.busy_timeout_s = busy_timeout_s
        self.pool_size = pool_size
        self._local = threading.local()  # the connection this thread has checked out, if any
        self._idle: List[Any] = []
        self._open = 0
        self._closed = False
        self._cv = threading.Condition()
        self._trace: Optional[Callable[[str], object]] = None

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the database is, for logs (never a password)."""
        ...

    # engine hooks -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _new(self) -> Any:
        ...

    @abc.abstractmethod
    def _rollback_if_open(self, conn: Any) -> None:
        """Roll back a transaction left open on ``conn`` (never hand on a connection inside one)."""
        ...

    def _reusable(self, conn: Any) -> bool:
        return True

    @abc.abstractmethod
    def _close_conn(self, conn: Any) -> None:
        ...

    @abc.abstractmethod
    def _begin(self, conn: Any) -> None:
        ...

    @abc.abstractmethod
    def _commit(self, conn: Any) -> None:
        ...

    @abc.abstractmethod
    def _rollback(self, conn: Any) -> None:
        ...

    @abc.abstractmethod
    def _execute(self, conn: Any, sql: str, args: Sequence[Any]) -> Any:
        """Run one statement (written with ``?`` placeholders) on ``conn``; its cursor."""
        ...

    @abc.abstractmethod
    def _executemany(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        ...

    # connections ------------------------------------------------------------------------------
    def _checkout(self) -> Any:
        deadline = time.monotonic() + self.busy_timeout_s
        with self._cv:
            while True:
                if self._idle:
                    return self._idle.pop()  # the most recently used: its cache is warm
                if self._open < self.pool_size:
                    self._open += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("all %d database connections stayed busy for %.0f s", self.pool_size,
                                self.busy_timeout_s)
                    raise Busy("the server's database is busy: retry in a few seconds", retry_after=2)
                self._cv.wait(left)
        try:
            return self._new()
        except BaseException:
            with self._cv:
                self._open -= 1
                self._cv.notify()
            raise

    def _checkin(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            self._rollback_if_open(conn)
        with self._cv:
            if self._closed or not self._reusable(conn):
                self._open -= 1
                with contextlib.suppress(Exception):
                    self._close_conn(conn)
            else:
                self._idle.append(conn)
            self._cv.notify()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A connection of the pool for the duration of the block; nested uses in one thread get
        the same connection (a read inside a transaction sees the transaction)."""
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        conn = self._checkout()
        self._local.conn = conn
        try:
            yield conn
        finally:
            self._local.conn = None
            self._checkin(conn)

    def open_connections(self) -> int:
        """Connections open now (at most ``pool_size``)."""
        with self._cv:
            return self._open

    def trace(self, callback: Optional[Callable[[str], object]]) -> None:
        """Pass every SQL statement run from now on to ``callback`` (tests; None stops it)."""
        with self._cv:
            self._trace = callback

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for conn in self._idle:
                self._open -= 1
                with contextlib.suppress(Exception):
                    self._close_conn(conn)
            self._idle.clear()
            self._cv.notify_all()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction: committed on success, rolled back on error. Write transactions
        never run at the same time (``BEGIN IMMEDIATE``, or PostgreSQL's advisory lock)."""
        with self.connection() as conn:
            self._begin(conn)
            try:
                yield conn
            except BaseException:
                self._rollback(conn)
                raise
            else:
                self._commit(conn)

    # statements -------------------------------------------------------------------------------
    def run(self, conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        """One statement on ``conn`` (a connection of this database); its cursor."""
        return self._execute(conn, sql, args)

    def run_many(self, conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._executemany(conn, sql, rows)

    def one(self, sql: str, args: Sequence[Any] = ()) -> Optional[Dict[str, Any]]:
        with self.connection() as conn:
            row = self._execute(conn, sql, args).fetchone()
            return dict(row) if row is not None else None

    def all(self, sql: str, args: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        with self.connection() as conn:
            return [dict(r) for r in self._execute(conn, sql, args).fetchall()]

    def notify(self, conn: Any, channel: str, payload: str) -> None:  # noqa: B027 - no-op on one process
        """Tell the other replicas on this database, when ``conn``'s transaction commits (nothing
        on an engine of one process: its waiters are woken in the process)."""

    def listen(self, channel: str, callback: Callable[[str], object]) -> None:  # noqa: B027
        """Call ``callback(payload)`` for each :meth:`notify` on ``channel`` by any replica (and
        once with ``""`` whenever notifications may have been missed). Nothing on an engine of
        one process."""

    def leader(self, name: str) -> bool:
        """Whether this process holds the leadership ``name`` among the replicas on this
        database (taken here if free). One process per database on SQLite: always."""
        return True

    def shared_secret(self, name: str, make: Callable[[], str]) -> Optional[str]:
        """A secret every replica on this database shares (``make()`` by the first that asks);
        None on an engine of one process (the caller keeps its own)."""
        return None

    # schema -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def schema_version(self) -> int:
        ...

    @abc.abstractmethod
    def migrate(self) -> None:
        ...

    def _migrate(self, conn: Any, version: int, where: str) -> None:
        """Inside the migration transaction: from ``version`` to :data:`SCHEMA_VERSION`."""
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{where} has schema version {version}, newer than this server's {SCHEMA_VERSION}: "
                "run a newer go2cloud_server or use another database"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            log.info("migrating %s to schema version %d", where, v)
            for stmt in migration_statements(v, self.dialect):
                self._execute(conn, stmt, ())
            self._execute(
                conn,
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(v),),
            )


class Store(Database):
    """The SQLite database at ``path`` (the embedded default), through a pool of at most
    ``pool_size`` connections."""

    dialect = SQLITE

    def __init__(self, path: Path, busy_timeout_s: float = 30.0, pool_size: int = POOL_SIZE) -> None:
        super().__init__(busy_timeout_s, pool_size)
        self.path = Path(path)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def _new(self) -> sqlite3.Connection:
        if not self.path.exists():  # created 0600: SQLite gives its WAL and SHM files that mode
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                os.close(os.open(str(self.path), flags, 0o600))
        conn = sqlite3.connect(
            str(self.path), timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
        if self._trace is not None:
            conn.set_trace_callback(self._trace)
        return conn

    def _rollback_if_open(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def _close_conn(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")

    def _execute(self, conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        return conn.execute(sql, args)

    def _executemany(self, conn: sqlite3.Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn.executemany(sql, rows)

    def trace(self, callback: Optional[Callable[[str], object]]) -> None:
        with self._cv:
            self._trace = callback
            for conn in self._idle:
                conn.set_trace_callback(callback)

    @staticmethod
    def q_one(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> Optional[Dict[str, Any]]:
        row = conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    @staticmethod
    def q_all(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> List[Dict[str, Any]]:
        return [dict(r) for r in conn.execute(sql, args).fetchall()]

    # schema -----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        with self.connection() as conn:
            sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            has_meta = conn.execute(sql).fetchone()
            if not has_meta:
                return 0
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            return int(row[0]) if row else 0

    def _restrict_modes(self) -> None:
        """The database and its ``-wal``/``-shm`` files (target passwords, block tokens) are for
        the server's user only. SQLite creates the WAL and SHM files with the mode of the
        database file, which :meth:`_new` creates 0600; this also fixes the files of an older
        server."""
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                path.chmod(0o600)
            except FileNotFoundError:
                pass
            except OSError:  # pragma: no cover - e.g. a filesystem without modes
                pass

    def migrate(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._restrict_modes()
        with self.transaction() as conn:
            version = 0
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                version = int(row[0]) if row else 0
            self._migrate(conn, version, str(self.path))
        self._restrict_modes()


def open_database(database: Optional[str], data_dir: Path, pool_size: int = POOL_SIZE) -> Database:
    """The database ``serve`` was given (``--database``): a ``postgresql://`` URL, or None for
    the SQLite file in the data directory. Not migrated yet."""
    from go2cloud_server.errors import InvalidInput

    if not database:
        return Store(Path(data_dir) / "server.db", pool_size=pool_size)
    scheme = database.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        from go2cloud_server.pgstore import PgStore

        return PgStore(database, pool_size=pool_size)
    raise InvalidInput(
        "--database: expected postgresql://USER@HOST:PORT/DATABASE (or no --database for the SQLite file "
        "in the data directory)"
    )


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def loads(value: Optional[str], default: Any = None) -> Any:
    if value is None or value == "":
        return default
    return json.loads(value)
