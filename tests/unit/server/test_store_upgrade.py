"""An existing data directory opens with this server: ``data/server-v6.sql`` is the database of
schema version 6 that the server before the PostgreSQL engine wrote (its workgroups, codes,
sources imported in the same second, tasks cancelled and started again in the same second,
commands, events), and ``data/server-v6.json`` what that server showed for it. Migrated to the
current version it keeps every row and shows exactly the same (the order of lists and the
"latest task" included, which relied on SQLite's rowid before)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from go2cloud_server.service import Service
from go2cloud_server.store import SCHEMA_VERSION, Store
from tests.unit.server.conftest import FakeClock, FakeRsyncd, FakeTrees, import_body

DATA = Path(__file__).parent / "data"
TABLES = ("workgroups", "codes", "sources", "tasks", "commands", "events", "drills", "artifacts",
          "cycle_writers")


def _rows(db: Path) -> dict:
    conn = sqlite3.connect(db)
    try:
        out = {}
        for table in TABLES:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] != "seq"]
            out[table] = conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid").fetchall()
        return out
    finally:
        conn.close()


def _v6_data_dir(tmp_path: Path) -> Path:
    db = tmp_path / "server.db"
    conn = sqlite3.connect(db)
    conn.executescript((DATA / "server-v6.sql").read_text())
    conn.close()
    return db


def _service(tmp_path: Path, store: Store) -> Service:
    return Service(store, tmp_path, rsyncd=FakeRsyncd(), tree_factory=FakeTrees(), clock=FakeClock(),
                   public_url="https://10.0.0.1:8443", fingerprint="sha256:" + "ab" * 32)


def test_a_version_6_data_dir_opens_with_every_row_and_the_same_views(tmp_path):
    db = _v6_data_dir(tmp_path)
    before = _rows(db)
    assert sum(len(v) for v in before.values()) > 30  # the fixture has content
    store = Store(db)
    assert store.schema_version() == 6
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION == 7
    assert _rows(db) == before
    svc = _service(tmp_path, store)
    expected = json.loads((DATA / "server-v6.json").read_text())
    sids = [s["id"] for s in expected["list_sources"]["sources"]]
    views = {"list_sources": svc.list_sources(), "list_codes": svc.list_codes(),
             "workgroups": svc.list_workgroups(),
             "source_migration": {s: svc.source_migration(s) for s in sids},
             "show_source": {s: svc.show_source(s) for s in sids},
             "pending": {s: svc.poll_commands(s, 0) for s in sids},
             "workgroup_migration": svc.workgroup_migration("web-tier")}
    assert json.loads(json.dumps(views)) == expected
    # a migrated database numbers new rows after the old ones: a source imported now is listed last
    code = svc.create_code("web-tier", {"uses": 1})
    new = svc.import_source(import_body(code))["source_id"]
    assert [s["id"] for s in svc.list_sources()["sources"]] == sids + [new]
    svc.close()
    store.close()
    # opening it again changes nothing (the migrations ran once)
    again = Store(db)
    again.migrate()
    assert again.schema_version() == SCHEMA_VERSION
    assert _rows(db)["sources"][-1][0] == new
    again.close()


def test_a_fresh_sqlite_schema_equals_a_migrated_one(tmp_path):
    """One definition: a database made at version 7 and one migrated from 6 have the same tables,
    columns, indexes and triggers."""
    fresh = Store(tmp_path / "fresh.db")
    fresh.migrate()
    fresh.close()
    migrated = Store(_v6_data_dir(tmp_path))
    migrated.migrate()
    migrated.close()

    def schema(path: Path) -> list:
        conn = sqlite3.connect(path)
        try:
            return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                       "WHERE name NOT LIKE 'sqlite_%'").fetchall())
        finally:
            conn.close()

    assert schema(tmp_path / "fresh.db") == schema(tmp_path / "server.db")
