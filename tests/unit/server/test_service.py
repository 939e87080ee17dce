from __future__ import annotations

import threading

import pytest

from go2cloud_server import rules
from go2cloud_server.clock import FakeClock
from go2cloud_server.errors import (
    AuthFailed,
    CodeRejected,
    Conflict,
    ImportRejected,
    InvalidInput,
    NotFound,
    SourceReplaced,
)
from go2cloud_server.scheduler import Scheduler
from go2cloud_server.service import Service
from go2cloud_server.service.codes import install_commands
from go2cloud_server.service.target_modes import default_paths
from go2cloud_server.service.workgroups import workgroup_status
from go2cloud_server.store import SCHEMA_VERSION, Store
from tests.unit.server.conftest import FakeTree, import_body, inventory, new_key, replace_proof


def _wg(service: Service, name: str = "web-tier") -> dict:
    return service.create_workgroup({"name": name})


def _imported(service: Service, wg: str = "web-tier", **kw) -> str:
    code = service.create_code(wg, {"uses": 10})
    return service.import_source(import_body(code, **kw))["source_id"]


def _cmds(service: Service, sid: str) -> list:
    return service.poll_commands(sid, 0)["commands"]


def _password(service: Service, tid: str) -> str:
    """The task's rsync password (kept in its database row)."""
    return service.store.one("SELECT rsync_password FROM tasks WHERE id = ?", (tid,))["rsync_password"]


# workgroups ------------------------------------------------------------------------------------
def test_workgroup_create_rules(service):
    wg = service.create_workgroup({"name": "東京-db", "description": "d", "tags": {"env": "prod"}})
    assert (
        wg["id"].startswith("wg-")
        and wg["tags"] == {"env": "prod"}
        and wg["migration_status"] == "not_started"
    )
    with pytest.raises(Conflict, match="already exists"):
        service.create_workgroup({"name": "東京-db"})
    with pytest.raises(InvalidInput, match="name"):
        service.create_workgroup({"name": "http://x"})
    assert service.show_workgroup("東京-db")["id"] == wg["id"]
    assert service.show_workgroup(wg["id"])["name"] == "東京-db"
    with pytest.raises(NotFound):
        service.show_workgroup("nope")


def test_workgroup_limit(service, monkeypatch):
    monkeypatch.setattr(rules, "MAX_WORKGROUPS", 3)
    for i in range(3):
        _wg(service, f"wg{i}")
    with pytest.raises(Conflict, match="limit"):
        _wg(service, "wg3")
    service.delete_workgroup("wg0")
    _wg(service, "wg3")


def test_workgroup_delete_only_when_empty(service):
    _wg(service)
    sid = _imported(service)
    with pytest.raises(Conflict, match="disassociate"):
        service.delete_workgroup("web-tier")
    service.disassociate(sid)
    assert service.delete_workgroup("web-tier") == {}
    assert service.list_workgroups()["workgroups"] == []


# activation codes ------------------------------------------------------------------------------
def test_code_create_defaults_and_secret_not_stored(service, store):
    _wg(service)
    code = service.create_code("web-tier", None)
    assert code["uses"] == 200 and code["uses_left"] == 200
    assert code["token_id"].startswith("at-") and len(code["token_code"]) >= 24
    assert code["commands"]["linux"] == (
        f"{{ curl -fsS --insecure --pinnedpubkey 'sha256//{'A' * 43}=' https://10.0.0.1:8443/download/install.sh"
        ' || echo "exit $?"; }'
        f" | GO2CLOUD_TOKEN_CODE='{code['token_code']}' sudo --preserve-env=GO2CLOUD_TOKEN_CODE bash -s --"
        " --server https://10.0.0.1:8443"
        f" --server-fingerprint sha256:{'ab' * 32} --token-id {code['token_id']}"
    )
    assert code["commands"]["powershell"].startswith(f"$env:GO2CLOUD_TOKEN_CODE='{code['token_code']}'; ")
    assert "DownloadString('https://10.0.0.1:8443/download/install.ps1')" in code["commands"]["powershell"]
    row = store.one("SELECT * FROM codes WHERE token_id = ?", (code["token_id"],))
    assert code["token_code"].encode() not in bytes(row["code_hash"]) and len(row["salt"]) == 16
    dump = b"".join(bytes(str(v), "utf-8") for v in row.values())
    assert code["token_code"].encode() not in dump
    listed = service.list_codes("web-tier")["codes"]
    assert [c["token_id"] for c in listed] == [code["token_id"]] and "token_code" not in listed[0]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"uses": 0}, "uses"),
        ({"uses": 1001}, "uses"),
        ({"days": 0}, "days"),
        ({"days": 91}, "days"),
        ({"uses": "5"}, "uses"),
    ],
)
def test_code_limits(service, body, field):
    _wg(service)
    with pytest.raises(InvalidInput, match=field):
        service.create_code("web-tier", body)


def test_code_errors_are_distinct(service, clock):
    _wg(service)
    code = service.create_code("web-tier", {"uses": 1})
    with pytest.raises(CodeRejected) as err:
        service.import_source(import_body(dict(code, token_code="wrong" + code["token_code"])))
    assert err.value.code == "code_unknown"
    with pytest.raises(CodeRejected) as err:
        service.import_source(import_body(dict(code, token_id="at-doesnotexist00")))
    assert err.value.code == "code_unknown"
    service.import_source(import_body(code))
    with pytest.raises(CodeRejected) as err:
        service.import_source(import_body(code))
    assert err.value.code == "code_exhausted"

    code2 = service.create_code("web-tier", {"uses": 5, "days": 1})
    clock.advance(86400 + 1)
    with pytest.raises(CodeRejected) as err:
        service.import_source(import_body(code2))
    assert err.value.code == "code_expired"

    code3 = service.create_code("web-tier", {"uses": 5})
    assert service.revoke_code(code3["token_id"])["state"] == "revoked"
    with pytest.raises(CodeRejected) as err:
        service.import_source(import_body(code3))
    assert err.value.code == "code_revoked"
    states = {c["token_id"]: c["state"] for c in service.list_codes()["codes"]}
    assert states == {
        code["token_id"]: "exhausted",
        code2["token_id"]: "expired",
        code3["token_id"]: "revoked",
    }
    with pytest.raises(NotFound):
        service.revoke_code("at-nope")


def test_concurrent_imports_consume_exactly_the_uses(tmp_path, service, store):
    _wg(service)
    code = service.create_code("web-tier", {"uses": 4})
    results: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            sid = service.import_source(import_body(code, inventory=inventory(f"h{i}", f"m{i}")))["source_id"]
            out = ("ok", sid)
        except CodeRejected as exc:
            out = ("rejected", exc.code)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    oks = [r for r in results if r[0] == "ok"]
    assert len(results) == 12
    assert len(oks) == 4
    assert sorted(r[1] for r in results if r[0] == "rejected") == ["code_exhausted"] * 8
    assert store.one("SELECT uses_left FROM codes")["uses_left"] == 0
    assert len(service.list_sources("web-tier")["sources"]) == 4


def test_workgroup_source_limit_on_import_and_associate(service, monkeypatch):
    monkeypatch.setattr(rules, "MAX_SOURCES_PER_WORKGROUP", 2)
    _wg(service)
    _wg(service, "other")
    _imported(service)
    _imported(service)
    with pytest.raises(ImportRejected, match="already has 2"):
        _imported(service)
    loner = _imported(service, "other")
    service.disassociate(loner)
    with pytest.raises(Conflict, match="already has 2"):
        service.associate(loner, {"workgroup": "web-tier"})


def test_source_in_at_most_one_workgroup(service):
    _wg(service)
    _wg(service, "other")
    sid = _imported(service)
    with pytest.raises(Conflict, match="another workgroup"):
        service.associate(sid, {"workgroup": "other"})
    service.disassociate(sid)
    assert service.associate(sid, {"workgroup": "other"})["workgroup"]["name"] == "other"


# status --------------------------------------------------------------------------------------------
def test_offline_after_three_missed_heartbeats(service, clock):
    _wg(service)
    sid = _imported(service)
    assert service.list_sources()["sources"][0]["status"] == "online"
    clock.advance(29)
    assert service.list_sources()["sources"][0]["status"] == "online"
    clock.advance(2)
    assert service.list_sources()["sources"][0]["status"] == "offline"
    service.heartbeat(sid, {"state": "idle"})
    assert service.list_sources()["sources"][0]["status"] == "online"
    clock.advance(31)
    assert service.show_source(sid)["status"] == "offline"


def test_workgroup_status_derivation():
    assert workgroup_status([]) == "not_started"
    assert workgroup_status(["syncing", "pending"]) == "in_progress"
    assert workgroup_status(["paused", "completed"]) == "paused"
    assert workgroup_status(["completed", "completed"]) == "completed"
    assert workgroup_status(["completed", "failed", "syncing"]) == "failed"


def test_default_paths_are_local_mount_points():
    assert default_paths(inventory()) == ["/", "/boot/efi", "/srv"]
    assert default_paths({"mounts": [{"mountpoint": "/x", "fstype": "nfs"}]}) == ["/"]
    assert default_paths({}) == ["/"]


def test_install_commands_single_builder():
    cmds = install_commands("https://h:1", "sha256:00", "at-1", "C0DE", "sha256//pin=")
    assert cmds["linux"].startswith("{ curl -fsS --insecure --pinnedpubkey 'sha256//pin=' https://h:1/")
    assert cmds["linux"].endswith("--token-id at-1") and "--token-code" not in cmds["linux"]
    assert "--token-code" not in cmds["powershell"] and cmds["powershell"].endswith("-TokenId 'at-1'")


# migration ------------------------------------------------------------------------------------------
def test_start_skips_and_not_migratable(service, clock):
    _wg(service)
    a = _imported(service, inventory=inventory("a", "ma"))
    clock.advance(25)
    b = _imported(service, inventory=inventory("b", "mb"))
    clock.advance(10)  # a: offline (35 s), b: online (10 s)
    out = service.start_migration({"drill": False}, workgroup="web-tier")
    assert [e["source_id"] for e in out["started"]] == [b]
    assert out["not_migratable"][0]["source_id"] == a and "offline" in out["not_migratable"][0]["reason"]
    service.heartbeat(a, {})
    again = service.start_migration({"drill": False, "paths": ["/srv"]}, workgroup="web-tier")
    assert [e["source_id"] for e in again["started"]] == [a]
    assert again["skipped"] == [
        {"source_id": b, "reason": f"already has migration task {out['started'][0]['task_id']} (syncing)"}
    ]
    cmd = _cmds(service, b)[0]
    assert cmd["type"] == "start"
    p = cmd["params"]
    assert p["paths"] == ["/", "/boot/efi", "/srv"] and p["compression"] == 7 and p["bandwidth_mbps"] == 0
    assert p["cycle"] == {"number": 1, "dest": "000001", "link_dest": None}
    tid = p["task_id"]
    assert p["target"] == {
        "kind": "rsync",
        "url": f"https://10.0.0.1:8443/rsync/v1/tasks/{tid}",
        "fingerprint": "sha256:" + "ab" * 32,
        "module": tid,
        "user": tid,
        "password": _password(service, tid),
    }
    assert len(p["target"]["password"]) >= 24
    assert _cmds(service, a)[0]["params"]["paths"] == ["/srv"]
    with pytest.raises(Conflict, match="already has migration task"):
        service.start_migration({"drill": False}, source=a)


def _ack(service, sid, cmd, status="succeeded", **kw):
    body = {
        "status": status,
        "error_code": kw.get("error_code"),
        "message": kw.get("message"),
        "result": kw.get("result", {}),
    }
    return service.ack_command(sid, cmd["id"], body)


def test_full_lifecycle_cycles_artifacts_retention_complete(service, rsyncd, trees, events):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False, "keep_images": 2}, workgroup="web-tier")
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    _ack(service, sid, start, "accepted")
    assert _cmds(service, sid)[0]["id"] == start["id"]  # accepted commands are delivered again
    assert service.source_migration(sid)["tasks"][0]["status"] == "syncing"
    _ack(service, sid, start)
    assert _cmds(service, sid) == []
    m = service.source_migration(sid)
    assert m["status"] == "pending" and m["source_status"] == "pending"
    assert [a["cycle"] for a in m["tasks"][0]["artifacts"]] == [1]
    _ack(service, sid, start, "failed")  # already final: no-op
    assert service.source_migration(sid)["status"] == "pending"

    for n in (2, 3):
        out = service.migration_action("sync", workgroup="web-tier")
        assert out["affected"][0]["task_id"] == tid
        cmd = _cmds(service, sid)[0]
        assert cmd["type"] == "sync"
        assert cmd["params"]["cycle"] == {"number": n, "dest": f"{n:06d}", "link_dest": f"{n - 1:06d}"}
        with pytest.raises(Conflict, match="already syncing"):
            service.migration_action("sync", source=sid)
        _ack(service, sid, cmd)
    assert [a["cycle"] for a in service.task_artifacts(tid)["artifacts"]] == [2, 3]  # keep 2
    root = service.tree_root(tid)
    # retention works from the database's committed cycles (plus the one just committed)
    assert trees.retained[root] == [[1], [1, 2], [1, 2, 3]]
    # every commit first ends the task's rsync session: nothing writes into a committed cycle
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert [events[i - 1] for i in commits] == [("close", tid)] * 3

    service.migration_action("complete", {"final_sync": True}, source=sid)
    fin = _cmds(service, sid)[0]
    assert fin["type"] == "finalize" and fin["params"]["cycle"]["number"] == 4
    assert service.source_migration(sid)["tasks"][0]["finalizing"] is True
    with pytest.raises(Conflict):
        service.migration_action("sync", source=sid)
    # the final cycle's data may still come in until the finalize is acknowledged
    spec = service.rsync_session_spec(tid, _password(service, tid), 4, "/srv")
    assert (spec.cycle, spec.link_cycle, spec.path) == (4, 3, "/srv")
    closed = len(rsyncd.closed)
    _ack(service, sid, fin)
    m = service.source_migration(sid)
    assert m["status"] == "completed" and m["source_status"] == "completed"
    assert [a["cycle"] for a in m["tasks"][0]["artifacts"]] == [3, 4]
    assert trees.retained[root][-1] == [2, 3, 4]
    assert rsyncd.closed[closed:] == [tid, tid]  # before the commit of cycle 4, and the release
    with pytest.raises(Conflict, match="completed"):
        service.rsync_session_spec(tid, _password(service, tid), 4, "/srv")
    assert service.show_workgroup("web-tier")["migration_status"] == "completed"
    out = service.migration_action("sync", workgroup="web-tier")
    assert out["affected"] == [] and out["skipped"][0]["reason"] == "no active migration task"


def test_complete_without_final_sync(service, rsyncd):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    _ack(service, sid, start)
    assert rsyncd.closed == [tid]  # before cycle 1 was committed
    service.migration_action("complete", {}, source=sid)
    fin = _cmds(service, sid)[0]
    assert fin["params"]["cycle"] is None
    assert service.source_migration(sid)["status"] == "pending"
    _ack(service, sid, fin)
    assert service.source_migration(sid)["status"] == "completed"
    assert rsyncd.closed == [tid, tid]  # released on completion


def test_failed_cycle_then_retry_reuses_the_cycle(service, trees):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]
    _ack(service, sid, start, "failed", error_code="replication_failed", message="rsync exit 23: /srv/x")
    t = service.source_migration(sid)["tasks"][0]
    assert t["status"] == "failed" and t["error"] == {
        "code": "replication_failed",
        "message": "rsync exit 23: /srv/x",
    }
    assert service.show_workgroup("web-tier")["migration_status"] == "failed"
    service.migration_action("sync", source=sid)
    retry = _cmds(service, sid)[0]
    assert retry["params"]["cycle"] == {"number": 1, "dest": "000001", "link_dest": None}
    assert service.source_migration(sid)["tasks"][0]["error"] is None
    _ack(service, sid, retry)
    assert service.source_migration(sid)["status"] == "pending"


def test_pause_resume_modify(service):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]
    with pytest.raises(Conflict, match="resume"):
        service.migration_action("resume", source=sid)
    service.migration_action("pause", source=sid)
    assert service.source_migration(sid)["status"] == "paused"
    assert service.show_workgroup("web-tier")["migration_status"] == "paused"
    with pytest.raises(Conflict, match="paused"):
        service.migration_action("sync", source=sid)
    service.migration_action(
        "modify",
        {"bandwidth_mbps": 50, "checksum": True, "sync_every_s": 3600, "name": "renamed"},
        source=sid,
    )
    service.migration_action("resume", source=sid)
    cmds = _cmds(service, sid)
    assert [c["type"] for c in cmds] == ["start", "pause", "modify", "resume"]
    assert cmds[2]["params"] == {
        "task_id": start["params"]["task_id"],
        "bandwidth_mbps": 50,
        "checksum": True,
    }
    t = service.source_migration(sid)["tasks"][0]
    assert (t["status"], t["bandwidth_mbps"], t["checksum"], t["sync_every_s"], t["name"]) == (
        "syncing",
        50,
        True,
        3600,
        "renamed",
    )
    with pytest.raises(InvalidInput):
        service.migration_action("modify", {}, source=sid)
    with pytest.raises(InvalidInput, match="compression"):
        service.migration_action("modify", {"compression": 11}, source=sid)
    # agent view of the task carries the new options and the target password
    view = service.agent_task(sid, t["task_id"])
    assert view["bandwidth_mbps"] == 50 and view["target"]["password"] and view["cycle"]["number"] == 1
    with pytest.raises(NotFound):
        service.agent_task("s-other", t["task_id"])


def test_cancel_releases_target_and_drops_queued_commands(service, rsyncd, trees, events):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    _ack(service, sid, start)
    service.migration_action("sync", source=sid)
    service.migration_action("cancel", source=sid)
    cmds = _cmds(service, sid)
    assert [c["type"] for c in cmds] == ["abort"]  # the queued sync was superseded
    root = service.tree_root(tid)
    assert trees.discarded[root] == [2] and trees.committed[root] == [1]
    # the session (if any) ends before the unfinished cycle is removed
    assert events[-2:] == [("close", tid), ("discard", root, 2)]
    with pytest.raises(Conflict, match="cancelled"):
        service.rsync_session_spec(tid, _password(service, tid), 2, "/srv")
    m = service.source_migration(sid)
    assert m["status"] == "cancelled" and [a["cycle"] for a in m["tasks"][0]["artifacts"]] == [1]
    assert service.show_workgroup("web-tier")["migration_status"] == "not_started"
    # a new migration may start after a cancel
    assert service.start_migration({"drill": False}, source=sid)["started"]


def test_reimport_with_previous_source_id_replaces(service, rsyncd):
    _wg(service)
    old_key, old_pub = new_key()
    old = _imported(service, public_key=old_pub)
    service.start_migration({"drill": False}, source=old)
    tid = _cmds(service, old)[0]["params"]["task_id"]
    code = service.create_code("web-tier", {"uses": 3})
    _, other_pub = new_key()
    other_machine = service.import_source(
        import_body(code, previous_source_id=old, public_key=other_pub,
                    inventory=inventory(machine_id="different"),
                    previous_source_proof=replace_proof(service, old_key, old, other_pub))
    )
    assert service.agent_source(old)["state"] == "active"  # a different machine cannot replace it
    _, unproven_pub = new_key()
    unproven = service.import_source(import_body(code, previous_source_id=old, public_key=unproven_pub))
    assert unproven["replaced_source_id"] is None
    assert service.agent_source(old)["state"] == "active"  # nor can an import without the old key's proof
    _, new_pub = new_key()
    proof = replace_proof(service, old_key, old, new_pub)
    doc = service.import_source(import_body(code, previous_source_id=old, public_key=new_pub,
                                            previous_source_proof=proof))
    new = doc["source_id"]
    assert doc["replaced_source_id"] == old
    with pytest.raises(SourceReplaced):
        service.agent_source(old)
    assert service.show_source(old)["status"] == "replaced"
    assert service.show_source(old)["replaced_by"] == new
    assert service.source_migration(old)["tasks"][0]["status"] == "cancelled"
    assert rsyncd.closed == [tid]
    imported = {new, other_machine["source_id"], unproven["source_id"]}
    assert {s["id"] for s in service.list_sources("web-tier")["sources"]} == imported
    out = service.start_migration({"drill": False}, workgroup="web-tier")
    assert {e["source_id"] for e in out["started"]} == imported


class _PollClock:
    """The long poll's monotonic clock: it moves by ``step`` at each reading, and ``read_twice`` is
    set at the second reading (taken after the poll's first, empty look, while it holds the lock it
    waits on: a command queued from then on must wake it)."""

    def __init__(self, step: float = 0.0) -> None:
        self.step = step
        self.readings: list = []
        self.read_twice = threading.Event()

    def __call__(self) -> float:
        t = len(self.readings) * self.step
        self.readings.append(t)
        if len(self.readings) == 2:
            self.read_twice.set()
        return t


def test_long_poll_wakes_when_a_command_is_queued(service):
    _wg(service)
    sid = _imported(service)
    got: dict = {}
    frozen = _PollClock()  # never reaches the deadline: only a wake-up can end this poll

    def poll() -> None:
        got["cmds"] = service.poll_commands(sid, 20, monotonic=frozen)["commands"]

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    assert frozen.read_twice.wait(10), "the poll never looked for commands"
    service.start_migration({"drill": False}, source=sid)
    th.join(10)
    assert not th.is_alive(), "queueing a command did not wake the long poll"
    assert [c["type"] for c in got["cmds"]] == ["start"]


def test_long_poll_without_commands_answers_at_its_deadline(service):
    ticking = _PollClock(step=0.19)
    assert service.poll_commands("s-none", 0.2, monotonic=ticking)["commands"] == []
    assert ticking.readings[-1] >= 0.2  # it answered only once its clock passed the deadline
    assert ticking.readings[-2] < 0.2


def test_events_are_capped(service, monkeypatch):
    import go2cloud_server.service.agent as svc

    monkeypatch.setattr(svc, "MAX_EVENTS_PER_SOURCE", 5)
    _wg(service)
    sid = _imported(service)
    service.post_events(
        sid, {"events": [{"level": "info", "code": f"e{i}", "message": "m"} for i in range(8)]}
    )
    events = service.show_source(sid)["events"]
    assert [e["code"] for e in events] == ["e7", "e6", "e5", "e4", "e3"]
    with pytest.raises(InvalidInput):
        service.post_events(sid, {"events": [{}] * 101})


def test_scheduler_queues_sync_after_interval(service):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False, "sync_every_s": 120}, source=sid)
    _ack(service, sid, _cmds(service, sid)[0])
    mono = FakeClock()  # the scheduler's own clock: only its monotonic reading matters
    sched = Scheduler(service, clock=mono)
    assert sched.run_once() == 0  # first sight of cycle 1
    mono.advance(119)
    service.heartbeat(sid, {})
    assert sched.run_once() == 0
    mono.advance(2)
    assert sched.run_once() == 1
    cmd = _cmds(service, sid)[0]
    assert cmd["type"] == "sync" and cmd["params"]["cycle"]["number"] == 2
    assert sched.run_once() == 0  # syncing: not a candidate
    _ack(service, sid, cmd)
    mono.advance(79)
    assert sched.run_once() == 0  # new cycle seen at 200
    mono.advance(121)
    assert sched.run_once() == 1


def test_restore_targets_after_restart(tmp_path, service, rsyncd, trees, clock, open_store):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    tid = _cmds(service, sid)[0]["params"]["task_id"]
    password = _password(service, tid)
    trees.prepared.clear()
    restarted = Service(
        open_store(), tmp_path, rsyncd=rsyncd, tree_factory=trees, clock=clock,
        public_url="https://10.0.0.1:8443", fingerprint="sha256:" + "ab" * 32,
    )
    try:
        assert restarted.restore_targets() == 1
        assert trees.prepared == {restarted.tree_root(tid): {1}}  # the running cycle's directory
        target = restarted.agent_task(sid, tid)["target"]
        assert target["url"] == f"https://10.0.0.1:8443/rsync/v1/tasks/{tid}"
        assert target["password"] == password
        assert restarted.rsync_session_spec(tid, password, 1, "/").cycle == 1
    finally:
        restarted.close()


def test_rsync_session_spec_checks_credentials_state_cycle_and_path(service):
    _wg(service)
    sid = _imported(service)
    other = _imported(service, inventory=inventory("b", "mb"))
    service.start_migration({"drill": False, "paths": ["/", "/srv", "/srv/data"]}, source=sid)
    service.start_migration({"drill": False, "paths": ["/srv"]}, source=other)
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    other_tid = _cmds(service, other)[0]["params"]["task_id"]
    pw = _password(service, tid)

    spec = service.rsync_session_spec(tid, pw, 1, "/srv")
    assert (spec.task_id, spec.tree_root, spec.cycle, spec.path) == (tid, service.tree_root(tid), 1, "/srv")
    assert spec.link_cycle is None and spec.other_paths == ("/", "/srv/data")
    assert (spec.user, spec.password) == (tid, pw) and pw not in repr(spec)

    for task_id, password in ((tid, pw + "x"), (tid, ""), (tid, _password(service, other_tid)),
                              ("t-nope", pw), (tid, None)):
        with pytest.raises(AuthFailed):
            service.rsync_session_spec(task_id, password, 1, "/srv")
    for cycle in (2, 0, "1", None):
        with pytest.raises(Conflict, match="writing cycle 1"):
            service.rsync_session_spec(tid, pw, cycle, "/srv")
    for path in ("/etc", "/srv/", "/srv/data/x", "", None):
        with pytest.raises(InvalidInput, match="not one of the task's paths"):
            service.rsync_session_spec(tid, pw, 1, path)

    _ack(service, sid, start)  # cycle 1 committed: nothing may write now
    with pytest.raises(Conflict, match="pending"):
        service.rsync_session_spec(tid, pw, 1, "/srv")
    service.migration_action("sync", source=sid)
    spec = service.rsync_session_spec(tid, pw, 2, "/srv/data")
    assert (spec.cycle, spec.link_cycle, spec.other_paths) == (2, 1, ("/", "/srv"))
    service.migration_action("pause", source=sid)
    with pytest.raises(Conflict, match="paused"):
        service.rsync_session_spec(tid, pw, 2, "/srv/data")


def test_a_task_whose_cycle_cannot_be_prepared_at_start_fails_alone(tmp_path, service, rsyncd, trees, clock,
                                                                    monkeypatch, open_store):
    _wg(service)
    bad_sid = _imported(service)
    good_sid = _imported(service, inventory=inventory("b", "mb"))
    service.start_migration({"drill": False}, workgroup="web-tier")
    bad = _cmds(service, bad_sid)[0]["params"]["task_id"]
    good = _cmds(service, good_sid)[0]["params"]["task_id"]
    restarted = Service(open_store(), tmp_path, rsyncd=rsyncd, tree_factory=trees,
                        clock=clock)
    real_prepare = FakeTree.prepare_cycle

    def prepare(tree, n):
        if tree.root == restarted.tree_root(bad):
            raise FileExistsError(f"{tree.root}/000001 is a symlink")
        return real_prepare(tree, n)

    monkeypatch.setattr(FakeTree, "prepare_cycle", prepare)
    trees.prepared.clear()
    try:
        assert restarted.restore_targets() == 2  # the server starts; the other task goes on
        assert trees.prepared == {restarted.tree_root(good): {1}}
        failed = restarted.source_migration(bad_sid)["tasks"][0]
        assert failed["status"] == "failed" and failed["error"]["code"] == "target_state_invalid"
        assert "at server start, its cycle 1 cannot be prepared" in failed["error"]["message"]
        assert "is a symlink" in failed["error"]["message"] and "migration sync" in failed["error"]["message"]
        assert restarted.source_migration(good_sid)["tasks"][0]["status"] == "syncing"
        # the failed task is retried by the operator like any failed cycle
        monkeypatch.setattr(FakeTree, "prepare_cycle", real_prepare)
        restarted.migration_action("sync", source=bad_sid)
        assert restarted.source_migration(bad_sid)["tasks"][0]["status"] == "syncing"
    finally:
        restarted.close()


def test_fail_at_start_leaves_finished_tasks_and_no_task_alone(service):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    tid = _cmds(service, sid)[0]["params"]["task_id"]
    service.migration_action("cancel", source=sid)
    service.fail_at_start(tid, "something", RuntimeError("boom"))
    assert service.source_migration(sid)["tasks"][0]["status"] == "cancelled"
    service.fail_at_start(None, "something", RuntimeError("boom"))  # logged only
    service.fail_at_start("t-nope", "something", RuntimeError("boom"))


def test_an_acknowledgement_that_cannot_be_applied_at_start_fails_its_task(
        tmp_path, service, rsyncd, trees, clock, monkeypatch, open_store):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]

    def crash(*_a, **_k):
        raise _Crash()

    monkeypatch.setattr(service.commands, "on_command_final", crash)
    with pytest.raises(_Crash):
        _ack(service, sid, start)
    monkeypatch.undo()
    restarted = Service(open_store(), tmp_path, rsyncd=rsyncd, tree_factory=trees,
                        clock=clock)

    def broken(*_a, **_k):
        raise ValueError("the task row is unreadable")

    monkeypatch.setattr(restarted.commands, "on_command_final", broken)
    try:
        assert restarted.apply_unfinished() == 1  # no exception: the server starts
        t = restarted.source_migration(sid)["tasks"][0]
        assert t["status"] == "failed" and t["error"]["code"] == "target_state_invalid"
        assert "the start acknowledgement cannot be applied" in t["error"]["message"]
        assert "the task row is unreadable" in t["error"]["message"]
    finally:
        restarted.close()


def test_schema_version_and_newer_refused(tmp_path):
    st = Store(tmp_path / "x.db")
    st.migrate()
    assert st.schema_version() == SCHEMA_VERSION == 7
    with st.transaction() as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    from go2cloud_server.store import SchemaTooNew

    with pytest.raises(SchemaTooNew, match="newer"):
        st.migrate()


class _Crash(BaseException):
    """Stands for the server process dying (not an error the service would handle)."""


def test_acknowledgement_applied_after_a_crash_by_the_retry_or_the_next_start(
        tmp_path, service, store, rsyncd, trees, clock, monkeypatch, open_store):
    """The ack is stored, then applied (cycle committed, artifact recorded, task moved on) in a
    second step: a crash between the two must not lose the cycle's artifact."""
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]

    def crash(*_a, **_k):
        raise _Crash()

    monkeypatch.setattr(service.commands, "on_command_final", crash)
    with pytest.raises(_Crash):
        _ack(service, sid, start)
    assert store.one("SELECT status, applied FROM commands WHERE id = ?", (start["id"],)) == \
        {"status": "succeeded", "applied": 0}
    assert service.task_artifacts(tid)["artifacts"] == []

    # the agent did not get its answer and retries: the retry applies the stored acknowledgement
    monkeypatch.undo()
    _ack(service, sid, start)
    assert [a["cycle"] for a in service.task_artifacts(tid)["artifacts"]] == [1]
    assert service.source_migration(sid)["tasks"][0]["status"] == "pending"
    _ack(service, sid, start)  # applied now: a further retry changes nothing
    assert trees.committed[service.tree_root(tid)] == [1]

    # the same crash on the next cycle, and this time the server restarts before any retry
    service.migration_action("sync", source=sid)
    sync = _cmds(service, sid)[0]
    monkeypatch.setattr(service.commands, "on_command_final", crash)
    with pytest.raises(_Crash):
        _ack(service, sid, sync)
    monkeypatch.undo()
    restarted = Service(open_store(), tmp_path, rsyncd=rsyncd, tree_factory=trees,
                        clock=clock)
    try:
        assert restarted.apply_unfinished() == 1
        assert [a["cycle"] for a in restarted.task_artifacts(tid)["artifacts"]] == [1, 2]
        assert restarted.source_migration(sid)["tasks"][0]["status"] == "pending"
        assert restarted.apply_unfinished() == 0
    finally:
        restarted.close()


def test_a_cycle_failed_for_a_transient_cause_is_queued_again_with_backoff_bounded_per_day(service, clock):
    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, source=sid)
    cmd = _cmds(service, sid)[0]
    after, per_day = service.auto_retry.after_s, service.auto_retry.per_day
    assert (after, per_day) == (300, 3)
    for n in range(1, per_day + 1):
        _ack(service, sid, cmd, "failed", error_code="rsync_connection_failed",
             message="gave up after 1800s of retries")
        t = service.source_migration(sid)["tasks"][0]
        assert t["status"] == "failed" and t["auto_retry"]["retries_last_24h"] == n - 1
        # not before its backoff (doubled per retry of the day)
        clock.advance(after * 2 ** (n - 1) - 1)
        assert service.retry_transient_failures() == []
        clock.advance(1)
        assert service.retry_transient_failures() == [t["task_id"]]
        cmd = _cmds(service, sid)[0]
        assert cmd["type"] == "sync" and cmd["params"]["cycle"]["number"] == 1
        events = service.show_source(sid)["events"]
        assert events[0]["code"] == "sync_retried_automatically" and f"retry {n} of 3" in events[0]["message"]
        assert service.source_migration(sid)["tasks"][0]["status"] != "failed"
    assert "the last one today" in service.show_source(sid)["events"][0]["message"]
    # the day's retries are spent: the next failure waits for the operator
    _ack(service, sid, cmd, "failed", error_code="rsync_connection_failed", message="again")
    clock.advance(3600)
    assert service.retry_transient_failures() == []
    t = service.source_migration(sid)["tasks"][0]
    assert t["status"] == "failed" and t["auto_retry"] == {"retries_last_24h": 3, "max_per_24h": 3,
                                                           "next_at": None}
    clock.advance(2 * 86400)  # the retries left the 24-hour window: retried again
    assert service.retry_transient_failures() == [t["task_id"]]
    # a permanent cause is never retried automatically
    cmd = _cmds(service, sid)[0]
    _ack(service, sid, cmd, "failed", error_code="rsync_partial_transfer", message="unreadable files")
    clock.advance(2 * 86400)
    assert service.retry_transient_failures() == []
    assert service.source_migration(sid)["tasks"][0]["auto_retry"] is None


def test_heartbeat_keeps_the_agents_loops_and_retry_validated_and_bounded(service):
    _wg(service)
    sid = _imported(service)
    loops = {"commands": {"alive": False, "failures": 2, "last_error": "HomeFullError: " + "x" * 900,
                          "last_failure_at": "2027-01-01T00:00:00Z"},
             "heartbeat": {"alive": True, "failures": 0, "last_error": None, "last_failure_at": None},
             "bad name!": {"alive": True, "failures": 0}, "acks": {"alive": "yes", "failures": 0},
             **{f"l{i}": {"alive": True, "failures": 0} for i in range(40)}}
    retry = {"code": "rsync_connection_failed", "message": "m" * 5000, "attempt": 4,
             "next_attempt_in_s": 16.04, "failing_for_s": 61.0, "budget_s": 1800, "extra": "dropped"}
    service.heartbeat(sid, {"state": "running", "loops": loops, "retry": retry})
    agent = service.show_source(sid)["agent"]
    assert agent["loops"]["commands"]["failures"] == 2 and agent["loops"]["commands"]["alive"] is False
    assert len(agent["loops"]["commands"]["last_error"]) == 500
    assert "bad name!" not in agent["loops"] and "acks" not in agent["loops"] and len(agent["loops"]) == 16
    assert agent["retry"] == {"code": "rsync_connection_failed", "message": "m" * 1000, "attempt": 4,
                              "next_attempt_in_s": 16.0, "failing_for_s": 61.0, "budget_s": 1800.0}
    service.heartbeat(sid, {"state": "running", "loops": "junk", "retry": {"code": "Bad Code", "attempt": 1}})
    agent = service.show_source(sid)["agent"]
    assert agent["loops"] is None and agent["retry"] is None


def test_target_full_event_is_written_inside_the_tasks_transaction(service, monkeypatch):
    """The event that says the target is full is written with the same transaction that sets the
    task's state, never with a connection already handed back to the pool (another thread's
    transaction could take it, and the event would be rolled back with that one)."""
    from go2cloud_server.service.base import Concern

    _wg(service)
    sid = _imported(service)
    service.start_migration({"drill": False}, workgroup="web-tier")
    start = _cmds(service, sid)[0]
    tid = start["params"]["task_id"]
    _ack(service, sid, start, "accepted")
    written = []
    real_event = Concern.event

    def event(self, conn, source_id, level, code, message):
        written.append((code, conn.in_transaction))
        real_event(self, conn, source_id, level, code, message)

    monkeypatch.setattr(Concern, "event", event)
    service.mark_target_full(tid, "No space left on device")
    service.mark_target_full(tid, "No space left on device")  # the same episode: one event
    assert written == [("target_full", True)]
    task = service.source_migration(sid)["tasks"][0]
    assert task["status"] == "target_full" and "No space left" in task["error"]["message"]
    shown = service.show_source(sid)
    assert [e["code"] for e in shown["events"]].count("target_full") == 1
