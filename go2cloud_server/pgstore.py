"""The PostgreSQL engine of the control plane's database (``serve --database postgresql://...``).

Several replicas of ``serve`` share one database. What makes them safe together lives here:

* **Writes take turns.** Every write transaction starts with ``pg_advisory_xact_lock`` on one
  key (:data:`WRITE_LOCK`): the guarantee SQLite's ``BEGIN IMMEDIATE`` gives inside one process,
  now across every replica, so each read-check-write of the service (one use of an activation
  code, the workgroup limits, a lease) stays atomic. Reads run in parallel, outside of it. A
  writer that waits longer than ``busy_timeout_s`` gets :class:`~go2cloud_server.errors.Busy`.
* **Wake-ups cross replicas.** :meth:`PgStore.notify` is ``pg_notify`` inside the transaction
  (delivered when it commits); one listener thread per store holds a ``LISTEN`` connection and
  calls the callbacks of the channel. After its connection was lost it calls them once with
  ``""`` (something may have been missed) and listens again.
* **One leader per duty.** :meth:`PgStore.leader` holds a session-level advisory lock on a
  connection of its own: the scheduler runs its passes only in the replica that holds it. A
  replica that dies closes its connection and the lock passes to another.
* **Shared secrets** (the admin token) are rows of ``meta``, made by the first replica.

psycopg 3 is imported here only, and this module only when such a database is opened.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pg_sql_mod
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from go2cloud_server.errors import Busy, InvalidInput, ServerUnreachable
from go2cloud_server.store import POOL_SIZE, POSTGRESQL, Database, DatabaseError

log = logging.getLogger(__name__)


def lock_key(name: str) -> int:
    """The advisory lock key (a signed 64-bit number) of ``name``."""
    return int.from_bytes(hashlib.sha256(f"go2cloud_server:{name}".encode()).digest()[:8], "big", signed=True)


#: the lock every write transaction takes first
WRITE_LOCK = lock_key("write")
CONNECT_TIMEOUT_S = 10


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """A statement written with ``?`` placeholders in psycopg's ``%s`` style (a literal ``%``
    doubled). The repositories write no ``?`` inside string literals."""
    return sql.replace("%", "%%").replace("?", "%s")


def _args(args: Sequence[Any]) -> List[Any]:
    # SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL refuses a boolean there
    return [int(a) if isinstance(a, bool) else a for a in args]


class PgConnection(psycopg.Connection[Any]):
    """A connection that knows its store (the repositories run statements through it)."""

    store: PgStore

    @property
    def in_transaction(self) -> bool:
        """Like ``sqlite3.Connection.in_transaction``."""
        return self.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


class PgStore(Database):
    """The PostgreSQL database at ``url`` (``postgresql://USER[:PASSWORD]@HOST:PORT/DB``; libpq's
    environment and ``~/.pgpass`` apply as usual)."""

    dialect = POSTGRESQL

    def __init__(self, url: str, busy_timeout_s: float = 30.0, pool_size: int = POOL_SIZE) -> None:
        super().__init__(busy_timeout_s, pool_size)
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidInput(f"--database: not a PostgreSQL URL ({exc}): expected "
                               "postgresql://USER@HOST:PORT/DATABASE") from None
        self.url = url
        self._where = "PostgreSQL {user}@{host}:{port}/{dbname}".format(
            user=info.get("user", ""), host=info.get("host", ""), port=info.get("port", "5432"),
            dbname=info.get("dbname", ""))
        self._listener: Optional[_Listener] = None
        self._leaders: Dict[str, PgConnection] = {}
        self._leaders_lock = threading.Lock()

    def describe(self) -> str:
        return self._where

    # connections ------------------------------------------------------------------------------
    def connect(self) -> PgConnection:
        """A new connection of its own (autocommit; the pool's, the listener's, a leader's)."""
        try:
            conn = PgConnection.connect(self.url, autocommit=True, row_factory=dict_row,  # type: ignore[arg-type]
                                        connect_timeout=CONNECT_TIMEOUT_S, application_name="go2cloud_server")
        except psycopg.Error as exc:
            raise ServerUnreachable(
                f"cannot connect to the database ({self._where}): {str(exc).strip()}: check --database "
                "(or GO2CLOUD_DATABASE) and that PostgreSQL is running and accepts this user"
            ) from None
        conn.store = self
        timeout = f"{int(self.busy_timeout_s * 1000)}ms"
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (timeout,))
        return conn

    def _new(self) -> PgConnection:
        return self.connect()

    def _rollback_if_open(self, conn: PgConnection) -> None:
        if not conn.closed and conn.in_transaction:
            conn.execute("ROLLBACK")

    def _reusable(self, conn: PgConnection) -> bool:
        return not conn.closed and not conn.broken

    def _close_conn(self, conn: PgConnection) -> None:
        conn.close()

    def _begin(self, conn: PgConnection) -> None:
        self._execute(conn, "BEGIN", ())
        self._execute(conn, "SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def _commit(self, conn: PgConnection) -> None:
        self._execute(conn, "COMMIT", ())

    def _rollback(self, conn: PgConnection) -> None:
        if not conn.closed:
            self._execute(conn, "ROLLBACK", ())

    def _execute(self, conn: PgConnection, sql: str, args: Sequence[Any]) -> Any:
        if self._trace is not None:
            self._trace(sql)
        try:
            if args:
                return conn.execute(pg_sql(sql), _args(args))  # type: ignore[call-overload]
            return conn.execute(sql)  # type: ignore[call-overload]
        except pg_errors.LockNotAvailable:
            log.warning("a database write waited longer than %.0f s for its turn", self.busy_timeout_s)
            raise Busy("the server's database is busy: retry in a few seconds", retry_after=2) from None
        except psycopg.Error as exc:
            raise DatabaseError(f"{self._where}: {str(exc).strip()}") from exc

    def _executemany(self, conn: PgConnection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self._trace is not None:
            self._trace(sql)
        try:
            with conn.cursor() as cur:
                cur.executemany(pg_sql(sql), [_args(r) for r in rows])  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise DatabaseError(f"{self._where}: {str(exc).strip()}") from exc

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        with self._leaders_lock:
            for conn in self._leaders.values():
                with contextlib.suppress(Exception):
                    conn.close()
            self._leaders.clear()
        super().close()

    # replicas ---------------------------------------------------------------------------------
    def notify(self, conn: Any, channel: str, payload: str) -> None:
        self._execute(conn, "SELECT pg_notify(?, ?)", (channel, payload))

    def listen(self, channel: str, callback: Callable[[str], object]) -> None:
        with self._cv:
            if self._listener is None:
                self._listener = _Listener(self)
            listener = self._listener
        listener.add(channel, callback)

    def leader(self, name: str) -> bool:
        """Held while the session of the connection that took the lock lives: a dead replica's
        lock is released when PostgreSQL closes its session (at once when the process dies; after
        about 25 s of TCP keepalives when its machine or network is gone)."""
        with self._leaders_lock:
            conn = self._leaders.get(name)
            if conn is None or conn.closed or conn.broken:
                try:
                    conn = self._leaders[name] = self.connect()
                    for setting, value in (("tcp_keepalives_idle", "10"), ("tcp_keepalives_interval", "5"),
                                           ("tcp_keepalives_count", "3")):
                        conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
                except (ServerUnreachable, psycopg.Error) as exc:
                    log.warning("%s leadership: %s", name, exc)
                    self._leaders.pop(name, None)
                    return False
                conn.held = False  # type: ignore[attr-defined]
            try:
                if conn.held:  # type: ignore[attr-defined]
                    conn.execute("SELECT 1")  # still ours while its session lives
                    return True
                key = lock_key(f"leader:{name}")
                row = conn.execute("SELECT pg_try_advisory_lock(%s) AS held", (key,)).fetchone()
            except psycopg.Error:
                if conn.held:  # type: ignore[attr-defined]
                    log.warning("lost the %s leadership (its database connection broke)", name)
                with contextlib.suppress(Exception):
                    conn.close()
                self._leaders.pop(name, None)
                return False
            if row is None or not row["held"]:
                return False  # another replica leads; the connection stays for the next try
            log.info("this replica is the %s leader now", name)
            conn.held = True  # type: ignore[attr-defined]
            return True

    def shared_secret(self, name: str, make: Callable[[], str]) -> Optional[str]:
        key = f"secret:{name}"
        with self.transaction() as conn:
            row = self._execute(conn, "SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return str(row["value"])
            value = make()
            self._execute(conn, "INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            return value

    # schema -----------------------------------------------------------------------------------
    def _version(self, conn: Any) -> int:
        if self._execute(conn, "SELECT to_regclass('meta') AS t", ()).fetchone()["t"] is None:
            return 0
        row = self._execute(conn, "SELECT value FROM meta WHERE key = 'schema_version'", ()).fetchone()
        return int(row["value"]) if row else 0

    def schema_version(self) -> int:
        with self.connection() as conn:
            return self._version(conn)

    def migrate(self) -> None:
        """Bring the database to this server's schema in one transaction (replicas starting at
        once take turns: the second finds it done)."""
        with self.transaction() as conn:
            self._migrate(conn, self._version(conn), self._where)


class _Listener:
    """The ``LISTEN`` connection of one store, on a thread of its own (see the module docstring)."""

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self._callbacks: Dict[str, List[Callable[[str], object]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        #: notifications received, connections made after the first, and whether it listens now
        #: (tests see the cross-replica path ran)
        self.received = 0
        self.reconnects = -1
        self.listening = False
        self._thread = threading.Thread(target=self._run, name="db-listener", daemon=True)
        self._thread.start()

    def add(self, channel: str, callback: Callable[[str], object]) -> None:
        with self._lock:
            self._callbacks.setdefault(channel, []).append(callback)
        self._changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _call(self, channel: Optional[str], payload: str) -> None:
        with self._lock:
            targets = [cb for ch, cbs in self._callbacks.items() if channel in (None, ch) for cb in cbs]
        for cb in targets:
            try:
                cb(payload)
            except Exception:  # noqa: BLE001 - one callback's failure never stops the listener
                log.warning("a database notification callback failed", exc_info=True)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                conn = self.store.connect()
            except ServerUnreachable as exc:
                log.warning("database notifications: %s (retrying in %.0f s)", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            listening: set = set()
            try:
                while not self._stop.is_set():
                    with self._lock:
                        wanted = set(self._callbacks)
                    for channel in sorted(wanted - listening):
                        conn.execute(pg_sql_mod.SQL("LISTEN {}").format(pg_sql_mod.Identifier(channel)))
                        listening.add(channel)
                    if not self.listening:
                        self.listening = True
                        self.reconnects += 1
                        if self.reconnects:  # what was notified while it did not listen is unknown
                            self._call(None, "")
                    backoff = 0.5
                    self._changed.clear()
                    for note in conn.notifies(timeout=0.5):
                        self.received += 1
                        self._call(note.channel, note.payload)
                        if self._stop.is_set() or self._changed.is_set():
                            break
            except psycopg.Error as exc:
                self.listening = False
                if not self._stop.is_set():
                    log.warning("database notifications: connection lost (%s); listening again", exc)
                    self._call(None, "")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    conn.close()
