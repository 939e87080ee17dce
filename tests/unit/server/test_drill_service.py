"""The drill on the control plane: drilling -> drill_passed -> syncing, drill_abnormal, re-run,
override, an older agent answering unsupported, a failed drill, and the block capability."""

from __future__ import annotations

import pytest

from go2cloud_server.errors import Conflict, NothingStarted
from go2cloud_server.service import Service
from go2cloud_server.service.drills import drill_report
from tests.unit.server.conftest import import_body, inventory


def _source(service: Service, **inv) -> str:
    service.create_workgroup({"name": "web-tier"})
    code = service.create_code("web-tier", {"uses": 10})
    body = import_body(code)
    body["inventory"] = {**inventory(), **inv}
    return service.import_source(body)["source_id"]


def _cmds(service: Service, sid: str) -> list:
    return service.poll_commands(sid, 0)["commands"]


def _ack(service: Service, sid: str, cmd: dict, status: str = "succeeded", **kw) -> None:
    service.ack_command(sid, cmd["id"], {"status": status, "error_code": kw.get("error_code"),
                                         "message": kw.get("message"), "result": kw.get("result", {})})


def _report(*severities: str) -> dict:
    items = [{"check": f"c{i}", "severity": s, "finding": f"finding {i}", "fix": f"fix {i}", "data": {}}
             for i, s in enumerate(severities)]
    return {"drill": {"version": 1, "mode": "file", "passed": "critical" not in severities, "items": items}}


def _task(service: Service, sid: str) -> dict:
    return service.source_migration(sid)["tasks"][0]


def test_drill_passes_then_start_then_syncing(service):
    sid = _source(service)
    service.start_migration({"paths": ["/srv"]}, source=sid)
    (drill,) = _cmds(service, sid)
    assert drill["type"] == "drill" and drill["params"]["paths"] == ["/srv"]
    assert set(drill["params"]["target"]) == {"kind", "url", "fingerprint", "module"}  # no password
    assert drill["params"]["target"]["url"].startswith("https://10.0.0.1:8443/rsync/v1/tasks/")
    assert _task(service, sid)["status"] == "drilling"
    assert service.list_sources()["sources"][0]["status"] == "drilling"
    assert service.workgroup_migration("web-tier")["status"] == "in_progress"
    _ack(service, sid, drill, "accepted")
    _ack(service, sid, drill, result=_report("info", "warning"))
    assert _task(service, sid)["status"] == "drill_passed"
    (start,) = _cmds(service, sid)
    assert start["type"] == "start" and start["params"]["target"]["password"]
    _ack(service, sid, start, "accepted")
    task = _task(service, sid)
    assert task["status"] == "syncing"
    _ack(service, sid, start, result={"cycle": 1})
    task = _task(service, sid)
    assert [h["status"] for h in task["history"]] == ["drilling", "drill_passed", "syncing", "pending"]
    shown = service.source_drill(sid)
    assert shown["status"] == "passed"
    assert shown["report"]["summary"] == {"critical": 0, "warning": 1, "info": 1}
    assert shown["drill_id"] == drill["id"] and shown["override"] is None


def test_critical_item_stops_then_rerun_passes(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, result=_report("critical", "info"))
    task = _task(service, sid)
    assert task["status"] == "drill_abnormal" and "finding 0" in task["error"]["message"]
    assert _cmds(service, sid) == []  # nothing started
    assert service.workgroup_migration("web-tier")["status"] == "in_progress"
    with pytest.raises(Conflict, match="pause"):
        service.migration_action("pause", source=sid)
    again = service.migration_action("drill", {"override": False}, source=sid)
    (drill2,) = _cmds(service, sid)
    assert drill2["type"] == "drill" and again["affected"][0]["command_id"] == drill2["id"]
    with pytest.raises(Conflict, match="running"):
        service.migration_action("drill", {}, source=sid)
    _ack(service, sid, drill, result=_report("info"))  # a late answer of the old drill changes nothing
    assert _task(service, sid)["status"] == "drilling"
    _ack(service, sid, drill2, result=_report("info"))
    assert _task(service, sid)["status"] == "drill_passed"
    assert [c["type"] for c in _cmds(service, sid)] == ["start"]
    with pytest.raises(Conflict, match="before the first sync"):
        service.migration_action("drill", {}, source=sid)


def test_override_records_who_and_when(service, clock):
    sid = _source(service)
    service.start_migration({}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, result=_report("critical"))
    service.migration_action("drill", {"override": True, "by": "alice@ops"}, source=sid)
    task = _task(service, sid)
    assert task["status"] == "drill_passed"
    assert task["drill_override"]["by"] == "alice@ops" and task["drill_override"]["drill"] == drill["id"]
    assert service.source_drill(sid)["override"]["by"] == "alice@ops"
    assert [c["type"] for c in _cmds(service, sid)] == ["start"]


def test_override_while_drilling_supersedes_the_queued_drill(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    service.migration_action("drill", {"override": True}, source=sid)
    assert [c["type"] for c in _cmds(service, sid)] == ["start"]
    assert _task(service, sid)["drill_override"]["by"] == "operator"


def test_older_agent_unsupported_passes_with_a_warning_and_failed_drill_is_critical(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, "unsupported", error_code="unsupported", message="no drill here")
    assert _task(service, sid)["status"] == "drill_passed"
    report = service.source_drill(sid)["report"]
    assert report["ran"] is False and [i["check"] for i in report["items"]] == ["drill_not_run"]
    assert report["items"][0]["severity"] == "warning" and "0.1.0" in report["items"][0]["finding"]
    service.migration_action("cancel", source=sid)
    assert service.source_drill(sid)["task_status"] == "cancelled"

    service.start_migration({}, source=sid)
    drill = [c for c in _cmds(service, sid) if c["type"] == "drill"][0]
    _ack(service, sid, drill, "failed", error_code="drill_failed", message="the drill could not run: boom")
    assert _task(service, sid)["status"] == "drill_abnormal"
    assert service.source_drill(sid)["report"]["items"][0]["check"] == "drill_failed"


def test_drill_interrupted_by_an_agent_restart_runs_again_then_stops(service):
    """The agent answers a drill its restart cut short with failed/interrupted (it fails every
    command left running, tests/unit/agent): the drill only reads, so the control plane queues it
    again, up to DRILL_REQUEUES times; then the task stops at drill_abnormal as for any drill
    that could not run."""
    from go2cloud_server.service.drills import DRILL_REQUEUES

    interrupted = {"error_code": "interrupted",
                   "message": "the agent stopped while this command was running; it was not completed, "
                              "issue it again"}
    sid = _source(service)
    service.start_migration({"paths": ["/srv"]}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, "accepted")
    seen = [drill["id"]]
    for _ in range(DRILL_REQUEUES):
        _ack(service, sid, drill, "failed", **interrupted)
        (drill,) = _cmds(service, sid)  # queued again, same parameters
        assert drill["type"] == "drill" and drill["id"] not in seen and drill["params"]["paths"] == ["/srv"]
        seen.append(drill["id"])
        task = _task(service, sid)
        assert task["status"] == "drilling" and task["error"] is None
        assert service.source_drill(sid)["drill_id"] == drill["id"]
    _ack(service, sid, drill, "failed", **interrupted)  # once too often: stop and say why
    task = _task(service, sid)
    assert task["status"] == "drill_abnormal" and "not completed" in task["error"]["message"]
    assert _cmds(service, sid) == []
    assert [h["status"] for h in task["history"]] == ["drilling", "drill_abnormal"]
    # the operator re-runs it as before
    service.migration_action("drill", {}, source=sid)
    (rerun,) = _cmds(service, sid)
    _ack(service, sid, {"id": seen[0]}, "failed", **interrupted)  # the first drill again: nothing changes
    assert _task(service, sid)["status"] == "drilling"
    _ack(service, sid, rerun, result=_report("info"))
    assert _task(service, sid)["status"] == "drill_passed"
    assert [c["type"] for c in _cmds(service, sid)] == ["start"]


def test_a_failed_drill_that_was_not_interrupted_is_not_run_again(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, "failed", error_code="drill_failed", message="the drill could not run: boom")
    assert _task(service, sid)["status"] == "drill_abnormal" and _cmds(service, sid) == []


def test_no_drill_starts_at_once_and_cancel_while_drilling(service):
    sid = _source(service)
    service.start_migration({"drill": False}, source=sid)
    assert [c["type"] for c in _cmds(service, sid)] == ["start"]
    assert _task(service, sid)["status"] == "syncing"
    service.migration_action("cancel", source=sid)
    service.start_migration({}, source=sid)
    assert _task(service, sid)["status"] == "drilling"
    service.migration_action("cancel", source=sid)
    assert service.source_drill(sid)["status"] == "cancelled"


def test_modify_while_drilling_goes_into_the_start(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    (drill,) = _cmds(service, sid)
    out = service.migration_action("modify", {"compression": 2}, source=sid)
    assert out["affected"][0]["command_id"] is None
    _ack(service, sid, drill, result=_report("info"))
    (start,) = _cmds(service, sid)
    assert start["params"]["compression"] == 2


def test_report_is_checked_field_by_field():
    doc = drill_report("succeeded", None, {"drill": {"items": [
        {"check": "x" * 100, "severity": "fatal", "finding": 3, "fix": "f", "data": {"k": "v" * 5000}},
        "junk"]}})
    (item,) = doc["items"]
    assert item["severity"] == "warning" and len(item["check"]) == 64 and item["finding"] == ""
    assert item["data"] == {} and doc["passed"] is True
    empty = drill_report("succeeded", None, {"drill": {"items": []}})
    assert empty["passed"] is False


def test_block_mode_is_never_refused_for_the_whole_source(service):
    """The import no longer disables block mode: the backend is decided per disk when the task
    starts and drilled. Even an older agent's ``available: false`` does not refuse the start."""
    caps = {"block": {"available": True, "reason": None, "backends": ["fsfreeze", "live"],
                      "driver": {"name": "elastio-snap", "installed": False,
                                 "reason": "installing it failed"},
                      "volumes": {"/dev/vda1": {"usable": ["fsfreeze", "live"], "point_in_time": []}},
                      "point_in_time": False}}
    sid = _source(service, capabilities=caps)
    out = service.start_migration({"mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    assert out["started"] and out["not_migratable"] == []
    (drill,) = _cmds(service, sid)
    assert drill["type"] == "drill" and drill["params"]["snapshot"] == "auto"
    service.create_workgroup({"name": "old"})
    code = service.create_code("old", {"uses": 1})
    body = import_body(code)
    body["inventory"] = {**inventory(), "capabilities": {"block": {"available": False, "reason": "x"}}}
    old = service.import_source(body)["source_id"]
    assert service.start_migration({"mode": "block", "disks": ["/dev/vdb"]}, source=old)["started"]


def test_explicit_non_point_in_time_choice_is_recorded_in_history_and_drill_report(service):
    sid = _source(service)
    service.start_migration({"mode": "block", "disks": ["/dev/vdb"], "snapshot": "fsfreeze",
                             "by": "ops@console"}, source=sid)
    task = _task(service, sid)
    choice = task["history"][0]["snapshot_choice"]
    assert choice["backend"] == "fsfreeze" and choice["by"] == "ops@console"
    assert choice["at"] == task["history"][0]["at"]
    assert "writer" in choice["cost"] and "stall" in choice["cost"]
    assert task["snapshot_choice"] == choice
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, result=_report("info"))
    report = service.source_drill(sid)["report"]
    assert report["snapshot_choice"] == choice and report["passed"] is True
    item = [i for i in report["items"] if i["check"] == "snapshot_choice"]
    assert len(item) == 1 and "chosen explicitly by ops@console at " + choice["at"] in item[0]["finding"]
    assert report["summary"]["info"] == 2
    # auto or a point-in-time backend: nothing to record
    service.create_workgroup({"name": "pit"})
    code = service.create_code("pit", {"uses": 1})
    sid2 = service.import_source(import_body(code))["source_id"]
    service.start_migration({"mode": "block", "disks": ["/dev/vdb"], "snapshot": "reflink"}, source=sid2)
    assert _task(service, sid2)["snapshot_choice"] is None


def test_nothing_started_is_its_own_error(service):
    sid = _source(service)
    service.start_migration({}, source=sid)
    with pytest.raises(NothingStarted, match="already has migration task") as err:
        service.start_migration({}, source=sid)
    assert err.value.exit_code == 6 and err.value.code == "nothing_started" and err.value.http_status == 409


def test_block_mode_allowed_without_the_key_or_when_available(service):
    sid = _source(service, capabilities={"block": {"available": True, "reason": None, "backends": ["live"]}})
    assert service.start_migration({"mode": "block", "disks": ["/dev/vdb"]}, source=sid)["started"]
    service.create_workgroup({"name": "old-agents"})
    code = service.create_code("old-agents", {"uses": 1})
    sid2 = service.import_source(import_body(code))["source_id"]
    assert service.start_migration({"mode": "block", "disks": ["/dev/vdb"]}, source=sid2)["started"]


def test_server_time(service, clock):
    assert service.server_time() == {"server_time": "2027-01-15T08:00:00Z", "server_time_epoch": clock.t}


def test_schema_v2_database_gains_the_drill(tmp_path):
    import sqlite3

    from go2cloud_server.store import _SCHEMA_V1, _SCHEMA_V2, SCHEMA_VERSION, Store

    db = tmp_path / "server.db"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_V1 + ";" + _SCHEMA_V2)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.execute(
        "INSERT INTO tasks (id, source_id, name, paths, bandwidth_mbps, compression, checksum, keep_images, "
        "status, rsync_password, created_at, updated_at) "
        "VALUES ('t-1', 's-1', 'n', '[\"/srv\"]', 0, 7, 0, 3, 'syncing', 'pw', 'x', 'x')"
    )
    conn.commit()
    conn.close()
    st = Store(db)
    st.migrate()
    assert st.schema_version() == SCHEMA_VERSION == 7
    task = st.one("SELECT * FROM tasks WHERE id = 't-1'")
    assert task["status"] == "syncing" and task["history"] == "[]" and task["drill_command"] is None
    with st.transaction() as c:
        c.execute("INSERT INTO drills (id, source_id, task_id, status, created_at) "
                  "VALUES ('c-1', 's-1', 't-1', 'running', 'x')")
    st.migrate()  # idempotent
    st.close()


def test_data_from_the_agent_before_its_start_acknowledgement_is_accepted(service):
    """After a passed drill the task is ``drill_passed`` until the agent's ``accepted``
    acknowledgement of ``start`` arrives; the agent starts writing at once and sends that
    acknowledgement on another thread, so its first data request can come first (seen: a block
    cycle failed with 'refused the task token'). The data paths take such a request as the
    acknowledgement: the task is syncing from then on."""
    sid = _source(service)
    service.start_migration({"paths": ["/srv"]}, source=sid)
    (drill,) = _cmds(service, sid)
    _ack(service, sid, drill, result=_report("info"))
    (start,) = _cmds(service, sid)
    tid = start["params"]["task_id"]
    assert _task(service, sid)["status"] == "drill_passed"
    spec = service.rsync_session_spec(tid, start["params"]["target"]["password"], 1, "/srv")
    assert spec.cycle == 1
    assert _task(service, sid)["status"] == "syncing"
    _ack(service, sid, start, "accepted")  # arrives later: nothing changes
    assert _task(service, sid)["status"] == "syncing"

    body = import_body(service.create_code("web-tier", {"uses": 1}))
    body["inventory"] = inventory(hostname="db01", machine_id="m-2")
    blk = service.import_source(body)["source_id"]
    service.start_migration({"mode": "block", "disks": ["/dev/vdb"]}, source=blk)
    (drill,) = _cmds(service, blk)
    _ack(service, blk, drill, result=_report("info"))
    (start,) = _cmds(service, blk)
    assert _task(service, blk)["status"] == "drill_passed"
    token = start["params"]["target"]["token"]
    assert service.block_store_for(start["params"]["task_id"], "wrong") is None
    assert _task(service, blk)["status"] == "drill_passed"  # a wrong token changes nothing
    assert service.block_store_for(start["params"]["task_id"], token) is not None
    assert _task(service, blk)["status"] == "syncing"
