"""Repository functions that the service tests reach only on rare paths, checked directly on the
test's database (SQLite, or PostgreSQL with GO2CLOUD_TEST_DATABASE: tests/support/postgres.py)."""

from __future__ import annotations

from go2cloud_server.repositories import commands as repo_commands
from go2cloud_server.repositories import cycle_writers as repo_cycle_writers
from go2cloud_server.repositories import tasks as repo_tasks
from tests.unit.server.conftest import import_body


def test_newer_cycle_command_tells_a_superseded_cycle(service, store):
    service.create_workgroup({"name": "web-tier"})
    code = service.create_code("web-tier", {"uses": 1})
    sid = service.import_source(import_body(code))["source_id"]
    service.start_migration({"drill": False}, source=sid)
    start = service.poll_commands(sid, 0)["commands"][0]
    tid = start["params"]["task_id"]
    assert not repo_commands.newer_cycle_command(store, tid, start["id"])
    service.ack_command(sid, start["id"], {"status": "succeeded", "result": {}})
    service.task_action(tid, "sync")
    sync = service.poll_commands(sid, 0)["commands"][0]
    assert sync["type"] == "sync"
    assert repo_commands.newer_cycle_command(store, tid, start["id"])
    assert not repo_commands.newer_cycle_command(store, tid, sync["id"])


def test_a_cycle_writer_is_recorded_once_and_tasks_list_in_creation_order(service, store):
    with store.transaction() as conn:
        for epoch in (2, 1, 2):
            repo_cycle_writers.add(conn, "t-x", 1, epoch, "2027-01-01T00:00:00Z")
    assert repo_cycle_writers.epochs(store, "t-x", 1) == [1, 2]
    service.create_workgroup({"name": "web-tier"})
    code = service.create_code("web-tier", {"uses": 3})
    sids = [service.import_source(import_body(code))["source_id"] for _ in range(3)]
    service.start_migration({"drill": False}, workgroup="web-tier")  # three tasks in one second
    tids = [service.poll_commands(s, 0)["commands"][0]["params"]["task_id"] for s in sids]
    assert [t["id"] for t in repo_tasks.with_status(store, ["syncing", "drill_passed"])] == tids
