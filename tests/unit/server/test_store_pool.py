"""The database connection pool (go2cloud_server/store.py): bounded, reentrant, never leaking."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from go2cloud_server.errors import Busy
from go2cloud_server.store import Store


def test_many_threads_share_at_most_pool_size_connections(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", pool_size=3)
    store.migrate()
    errors = []
    start = threading.Barrier(40)

    def work() -> None:
        try:
            start.wait()
            for _ in range(20):
                with store.transaction() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('k', 'v')")
                    # a read inside the transaction uses the same connection (sees the write)
                    assert store.one("SELECT value FROM meta WHERE key = 'k'") == {"value": "v"}
                assert store.all("SELECT key FROM meta")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 1 <= store.open_connections() <= 3
    store.close()
    assert store.open_connections() == 0


def test_every_connection_busy_is_a_503_not_a_hang(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", pool_size=1, busy_timeout_s=0.2)
    store.migrate()
    held = threading.Event()
    done = threading.Event()

    def hold() -> None:
        with store.connection():
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        with pytest.raises(Busy):
            store.one("SELECT 1 AS x")
    finally:
        done.set()
        t.join()
    assert store.one("SELECT 1 AS x") == {"x": 1}


def test_a_connection_given_back_inside_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", pool_size=1)
    store.migrate()
    with store.connection() as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO meta (key, value) VALUES ('x', '1')")
    assert store.one("SELECT value FROM meta WHERE key = 'x'") is None
