"""Block-mode tasks in the control plane: start parameters, commands, target, the receiver's
resolver, commits per disk, retention, cancel, and the schema migration of an old data dir."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from go2cloud_server import rules
from go2cloud_server.errors import AuthFailed, Conflict, InvalidInput
from go2cloud_server.service import Service
from go2cloud_server.store import _SCHEMA_V1, SCHEMA_VERSION, Store
from tests.unit.server.conftest import import_body, inventory


class FakeBlockStore:
    def __init__(self, log: FakeBlockStores, root: Path) -> None:
        self.log, self.root = log, root
        self.committed: List[int] = []

    def commit_cycle(self, cycle: int) -> List[dict]:
        if self.log.fail_commit:
            raise OSError("disk full")
        self.committed.append(cycle)
        return [
            {"state": "pending", "disk": d, "cycle": cycle, "path": str(self.root / d / f"{cycle:06d}.img"),
             "bytes": 1 << 20, "sha256": None, "fs": None, "check": None}
            for d in self.log.disks
        ]

    def declare(self, disks: dict) -> None:
        self.declared = dict(disks)

    def verify_generation_steps(self, disk: str, cycle: int) -> Iterator[None]:
        return self.verify_generation(disk, cycle)
        yield  # a generator of no steps

    def verify_generation(self, disk: str, cycle: int) -> Optional[dict]:
        self.log.verifying.set()
        assert self.log.gate.wait(30), "the test never opened the gate"
        if cycle not in self.committed:
            return None  # discarded
        return {"state": "verified", "disk": disk, "cycle": cycle,
                "path": str(self.root / disk / f"{cycle:06d}.img"), "bytes": 1 << 20,
                "sha256": f"{cycle:064x}", "fs": "ext4",
                "check": {"tool": "e2fsck -n", "ok": True, "result": "clean"}}

    def retain(self, keep: int) -> List[int]:
        removed = self.committed[:-keep] if len(self.committed) > keep else []
        self.committed = self.committed[len(removed):]
        return removed

    def discard_cycle(self, cycle: int) -> None:
        self.log.discarded.append((self.root, cycle))

    def generation_report(self, disk: str, cycle: int) -> Optional[dict]:
        return None  # nothing moves in this fake

    def destroy(self) -> None:
        pass


class FakeBlockStores:
    def __init__(self) -> None:
        self.disks = ["vdb", "disk.img"]
        self.made: Dict[Path, FakeBlockStore] = {}
        self.discarded: list = []
        self.fail_commit = False
        self.gate = threading.Event()  # verifications wait for it
        self.gate.set()
        self.verifying = threading.Event()  # a verification started

    def __call__(self, root: Path) -> FakeBlockStore:
        if root not in self.made:
            self.made[root] = FakeBlockStore(self, root)
        return self.made[root]


@pytest.fixture
def blocks() -> FakeBlockStores:
    return FakeBlockStores()


def _service(tmp_path, store, rsyncd, trees, clock, factory) -> Service:
    return Service(store, tmp_path, rsyncd=rsyncd, tree_factory=trees, block_store_factory=factory,
                   public_host="10.0.0.1", public_url="https://10.0.0.1:8443",
                   fingerprint="sha256:" + "ab" * 32, heartbeat_interval=10, clock=clock)


@pytest.fixture
def bservice(tmp_path, store, rsyncd, trees, clock, blocks) -> Iterator[Service]:
    service = _service(tmp_path, store, rsyncd, trees, clock, blocks)
    yield service
    blocks.gate.set()
    service.close()


def wait_verified(service: Service, tid: str, timeout: float = 30) -> List[dict]:
    """Poll until no artifact of ``tid`` is pending (the verifier is a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        arts = service.task_artifacts(tid)["artifacts"]
        if all(a["report"].get("state") != "pending" for a in arts) and service.verifier.idle():
            return arts
        if time.monotonic() > deadline:
            raise AssertionError(f"artifacts still pending after {timeout} s: {arts}")
        time.sleep(0.01)


def _source(service: Service) -> str:
    service.create_workgroup({"name": "wg"})
    code = service.create_code("wg", {"uses": 5})
    return service.import_source(import_body(code))["source_id"]


def _cmds(service: Service, sid: str) -> list:
    return service.poll_commands(sid, 0)["commands"]


def _ack(service: Service, sid: str, cmd: dict, status: str = "succeeded") -> None:
    service.ack_command(sid, cmd["id"], {"status": status, "result": {}})


def test_disk_names_are_safe_and_unique():
    assert rules.disk_names(["/dev/vdb", "/dev/mapper/vg-root", "/srv/img/a b.img", "/x/vdb", "/d/..."]) == [
        {"name": "vdb", "path": "/dev/vdb"},
        {"name": "vg-root", "path": "/dev/mapper/vg-root"},
        {"name": "a_b.img", "path": "/srv/img/a b.img"},
        {"name": "vdb-2", "path": "/x/vdb"},
        {"name": "disk", "path": "/d/..."},
    ]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"mode": "tape", "disks": ["/dev/vdb"]}, "mode"),
        ({"mode": "block"}, "disks"),
        ({"mode": "block", "disks": []}, "disks"),
        ({"mode": "block", "disks": ["vdb"]}, "disks"),
        ({"mode": "block", "disks": ["/dev/../etc/passwd"]}, "disks"),
        ({"mode": "block", "disks": ["/"]}, "disks"),
        ({"mode": "block", "disks": ["/dev/vdb", "/dev/vdb"]}, "disks"),
        ({"mode": "block", "disks": ["/dev/vdb"], "paths": ["/srv"]}, "paths"),
        ({"mode": "block", "disks": ["/dev/vdb"], "snapshot": "zfs"}, "snapshot"),
        ({"disks": ["/dev/vdb"]}, "disks"),
        ({"paths": ["/srv"], "snapshot": "live"}, "snapshot"),
    ],
)
def test_start_parameters_are_checked(bservice, body, field):
    sid = _source(bservice)
    with pytest.raises(InvalidInput, match=field):
        bservice.start_migration(body, source=sid)
    assert bservice.source_migration(sid)["tasks"] == []


def test_block_start_command_target_and_task_document(bservice, rsyncd, trees):
    sid = _source(bservice)
    out = bservice.start_migration(  # no drill: the start is queued at once
        {"drill": False, "mode": "block", "disks": ["/dev/vdb", "/srv/disk.img"], "snapshot": "reflink"},
        source=sid,
    )
    tid = out["started"][0]["task_id"]
    (cmd,) = _cmds(bservice, sid)
    p = cmd["params"]
    assert cmd["type"] == "start" and p["mode"] == "block" and "paths" not in p
    assert p["disks"] == [{"name": "vdb", "path": "/dev/vdb"}, {"name": "disk.img", "path": "/srv/disk.img"}]
    assert p["snapshot"] == "reflink" and p["cycle"]["number"] == 1
    target = p["target"]
    assert target["kind"] == "block" and target["url"] == f"https://10.0.0.1:8443/block/v1/tasks/{tid}"
    assert target["fingerprint"] == "sha256:" + "ab" * 32 and len(target["token"]) >= 32
    assert not rsyncd.closed and not trees.prepared  # no rsync session, no tree
    for secret in (target["token"], ""):  # a block task has no rsync credentials
        with pytest.raises(AuthFailed):
            bservice.rsync_session_spec(tid, secret, 1, "/dev/vdb")
    doc = bservice.agent_task(sid, tid)
    assert doc["mode"] == "block" and doc["target"] == target and doc["snapshot"] == "reflink"
    assert doc["disks"] == p["disks"] and doc["cycle"]["number"] == 1
    view = bservice.source_migration(sid)["tasks"][0]
    assert view["mode"] == "block" and view["disks"] == p["disks"] and "token" not in str(view)

    # the receiver's resolver: right token and active block task only, constant-time compare
    assert bservice.block_store_for(tid, target["token"]) is bservice.block_store(tid)
    assert bservice.block_store_for(tid, target["token"] + "x") is None
    assert bservice.block_store_for(tid, "") is None
    assert bservice.block_store_for("t-nope", target["token"]) is None
    assert bservice.block_store_for(tid, None) is None  # type: ignore[arg-type]


def test_the_store_is_told_the_task_disks_and_their_inventory_sizes_once(bservice, tmp_path):
    bservice.create_workgroup({"name": "wg"})
    code = bservice.create_code("wg", {"uses": 5})
    inv = dict(inventory(), disks=[{"name": "vdb", "size_bytes": 8 << 30, "partitions": [
        {"name": "vdb1", "size_bytes": 4 << 30}]}])
    sid = bservice.import_source(import_body(code, inventory=inv))["source_id"]
    out = bservice.start_migration(
        {"drill": False, "mode": "block", "disks": ["/dev/vdb1", "/dev/vdc", "/srv/disk.img"]}, source=sid)
    tid = out["started"][0]["task_id"]
    token = _cmds(bservice, sid)[0]["params"]["target"]["token"]
    bs = bservice.block_store_for(tid, token)
    assert bs is not None and bs.declared == {"vdb1": 4 << 30, "vdc": None, "disk.img": None}
    # made once: later requests find it declared, without asking the database for the disks again
    queries: list = []
    bservice.store.trace(queries.append)
    try:
        assert bservice.block_store_for(tid, token) is bs
    finally:
        bservice.store.trace(None)
    assert len(queries) == 1 and "inventory" not in queries[0]


def test_default_snapshot_is_auto_and_file_tasks_have_no_block_store(bservice):
    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    assert _cmds(bservice, sid)[0]["params"]["snapshot"] == "auto"
    tid = bservice.source_migration(sid)["tasks"][0]["task_id"]
    bservice.migration_action("cancel", source=sid)
    sid2 = _source_again(bservice)
    bservice.start_migration({"drill": False, "paths": ["/srv"]}, source=sid2)
    ftid = bservice.source_migration(sid2)["tasks"][0]["task_id"]
    assert bservice.block_store_for(ftid, "") is None
    assert bservice.store.one("SELECT block_token FROM tasks WHERE id = ?", (ftid,))["block_token"] is None
    assert tid != ftid


def _source_again(service: Service) -> str:
    code = service.create_code("wg", {"uses": 1})
    return service.import_source(import_body(code, inventory={"hostname": "h2", "machine_id": "m-2"}))[
        "source_id"
    ]


def test_cycles_commit_one_artifact_per_disk_with_report_and_retention(bservice, blocks):
    sid = _source(bservice)
    bservice.start_migration(
        {"drill": False, "mode": "block", "disks": ["/dev/vdb", "/srv/disk.img"], "keep_images": 2},
        source=sid,
    )
    start = _cmds(bservice, sid)[0]
    tid = start["params"]["task_id"]
    _ack(bservice, sid, start)
    arts = wait_verified(bservice, tid)
    assert [(a["cycle"], a["disk"]) for a in arts] == [(1, "disk.img"), (1, "vdb")]
    vdb = arts[1]
    assert vdb["sha256"] == f"{1:064x}" and vdb["bytes"] == 1 << 20 and vdb["path"].endswith("vdb/000001.img")
    assert vdb["report"] == {"state": "verified", "fs": "ext4",
                             "check": {"tool": "e2fsck -n", "ok": True, "result": "clean"}}
    for n in (2, 3):
        bservice.migration_action("sync", source=sid)
        cmd = _cmds(bservice, sid)[0]
        assert cmd["params"]["cycle"]["number"] == n
        _ack(bservice, sid, cmd)
    assert sorted({a["cycle"] for a in wait_verified(bservice, tid)}) == [2, 3]
    bservice.migration_action("modify", {"keep_images": 1}, source=sid)
    assert {a["cycle"] for a in bservice.task_artifacts(tid)["artifacts"]} == {3}

    # a failing commit fails the task and records nothing
    blocks.fail_commit = True
    bservice.migration_action("sync", source=sid)
    _ack(bservice, sid, _cmds(bservice, sid)[0])
    task = bservice.source_migration(sid)["tasks"][0]
    assert task["status"] == "failed" and task["error"]["code"] == "target_commit_failed"
    assert {a["cycle"] for a in bservice.task_artifacts(tid)["artifacts"]} == {3}


def test_cancel_discards_the_running_cycle_and_refuses_the_token(bservice, blocks):
    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    start = _cmds(bservice, sid)[0]
    tid, token = start["params"]["task_id"], start["params"]["target"]["token"]
    _ack(bservice, sid, start)
    bservice.migration_action("sync", source=sid)
    bservice.migration_action("cancel", source=sid)
    assert (bservice.block_root(tid), 2) in blocks.discarded
    assert bservice.block_store_for(tid, token) is None
    assert {a["cycle"] for a in bservice.task_artifacts(tid)["artifacts"]} == {1}  # kept
    assert [c["type"] for c in _cmds(bservice, sid)] == ["abort"]  # the queued sync was dropped
    with pytest.raises(Conflict):
        bservice.migration_action("resume", source=sid)


def test_completion_with_final_sync(bservice):
    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    start = _cmds(bservice, sid)[0]
    tid, token = start["params"]["task_id"], start["params"]["target"]["token"]
    _ack(bservice, sid, start)
    bservice.migration_action("complete", {"final_sync": True}, source=sid)
    fin = _cmds(bservice, sid)[0]
    assert fin["type"] == "finalize" and fin["params"]["cycle"]["number"] == 2
    assert bservice.block_store_for(tid, token) is not None
    _ack(bservice, sid, fin)
    assert bservice.source_migration(sid)["status"] == "completed"
    assert bservice.block_store_for(tid, token) is None
    assert {a["cycle"] for a in bservice.task_artifacts(tid)["artifacts"]} == {1, 2}


def test_schema_v1_data_dir_is_migrated(tmp_path):
    db = tmp_path / "server.db"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_V1)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute(
        "INSERT INTO tasks (id, source_id, name, paths, bandwidth_mbps, compression, checksum, keep_images, "
        "status, rsync_password, created_at, updated_at) "
        "VALUES ('t-1', 's-1', 'n', '[\"/srv\"]', 0, 7, 0, 3, 'pending', 'pw', 'x', 'x')"
    )
    conn.execute("INSERT INTO artifacts VALUES ('t-1', 1, '/data/t-1/tree/000001', 10, 2, 'x')")
    conn.commit()
    conn.close()
    st = Store(db)
    st.migrate()
    assert st.schema_version() == SCHEMA_VERSION == 7
    task = st.one("SELECT * FROM tasks WHERE id = 't-1'")
    assert task["mode"] == "file" and task["disks"] == "[]" and task["block_token"] is None
    # v3: the drill columns, and an old task has no drill and an empty history
    assert task["drill_command"] is None and task["drill_override"] is None and task["history"] == "[]"
    assert st.all("SELECT * FROM drills") == []
    art = st.one("SELECT * FROM artifacts")
    assert (art["cycle"], art["disk"], art["files"], art["path"]) == (1, "", 2, "/data/t-1/tree/000001")
    with st.transaction() as c:  # the new primary key allows one row per disk
        c.execute("INSERT INTO artifacts (task_id, cycle, disk, path, bytes, files, created_at) "
                  "VALUES ('t-1', 1, 'vdb', 'p', 1, 0, 'x')")
    st.migrate()  # idempotent
    st.close()


# -- the verifier: acknowledgements do not wait for sha256 and fsck ---------------------------------
def test_ack_returns_before_the_check_and_the_artifact_goes_pending_then_verified(
    tmp_path, store, rsyncd, trees, clock, monkeypatch
):
    from go2cloud_server import blockstore

    started, release = threading.Event(), threading.Event()

    def slow_check(path, fs):  # a check that takes "minutes": until the test releases it
        started.set()
        assert release.wait(30), "the test never released the check"
        return {"tool": "e2fsck -f -n", "rc": 0, "ok": True, "summary": "clean"}

    monkeypatch.setattr(blockstore, "detect_fs", lambda path: "ext4")
    monkeypatch.setattr(blockstore, "fs_check", slow_check)
    service = _service(tmp_path, store, rsyncd, trees, clock, blockstore.BlockTaskStore)
    try:
        sid = _source(service)
        service.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
        start = _cmds(service, sid)[0]
        tid = start["params"]["task_id"]
        want = _write_and_commit(service.block_store(tid), 1)

        _ack(service, sid, start)  # returns while the check is blocked (else this would hang)
        assert started.wait(30), "the verifier never started the check"
        (art,) = service.task_artifacts(tid)["artifacts"]
        assert art["sha256"] is None and art["report"]["state"] == "pending" and art["bytes"] == 4 * 65536
        assert service.source_migration(sid)["tasks"][0]["status"] == "pending"  # the cycle is done
        release.set()
        (art,) = wait_verified(service, tid)
        assert art["sha256"] == want and art["report"]["state"] == "verified" and art["report"]["check"]["ok"]
    finally:
        release.set()
        service.close()


def _write_and_commit(bs, cycle: int) -> str:
    """Write one data chunk into disk vdb of a real block store, commit ``cycle``; the sha256 of
    the image."""
    import xxhash

    cs, size = 65536, 4 * 65536
    data = bytes([cycle]) * cs
    bs.write_chunk("vdb", 1, cs, size, data, xxhash.xxh3_128(data).hexdigest())
    hashes = [xxhash.xxh3_128(bytes(cs)).digest()] * 4
    hashes[1] = xxhash.xxh3_128(data).digest()
    bs.commit("vdb", cycle, size, b"".join(hashes), cs)
    return hashlib.sha256((bs.root / "vdb" / "current.img").read_bytes()).hexdigest()


def test_a_restarted_service_verifies_what_was_left_pending(
    tmp_path, store, rsyncd, trees, clock, monkeypatch
):
    from go2cloud_server import blockstore

    monkeypatch.setattr(blockstore, "detect_fs", lambda path: None)
    first = _service(tmp_path, store, rsyncd, trees, clock, blockstore.BlockTaskStore)
    monkeypatch.setattr(first.verifier, "submit", lambda *job: None)  # the server dies before verifying
    sid = _source(first)
    first.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    start = _cmds(first, sid)[0]
    tid = start["params"]["task_id"]
    want = _write_and_commit(first.block_store(tid), 1)
    _ack(first, sid, start)
    (art,) = first.task_artifacts(tid)["artifacts"]
    assert art["report"]["state"] == "pending" and art["sha256"] is None
    first.close()

    again = _service(tmp_path, store, rsyncd, trees, clock, blockstore.BlockTaskStore)
    try:
        assert again.start() == 1
        (art,) = wait_verified(again, tid)
        assert art["sha256"] == want and art["report"]["state"] == "verified"
        assert art["report"]["check"] is None  # no filesystem found: nothing to check
        assert again.start() == 0  # nothing left
    finally:
        again.close()


def test_retention_discards_a_generation_while_it_is_verified(bservice, blocks):
    blocks.disks = ["vdb"]
    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"], "keep_images": 1},
                             source=sid)
    start = _cmds(bservice, sid)[0]
    tid = start["params"]["task_id"]
    blocks.gate.clear()
    _ack(bservice, sid, start)
    assert blocks.verifying.wait(30)  # cycle 1 is being verified (blocked)
    bservice.migration_action("sync", source=sid)
    _ack(bservice, sid, _cmds(bservice, sid)[0])  # cycle 2; keep 1: cycle 1 is discarded
    assert [(a["cycle"], a["report"]["state"]) for a in bservice.task_artifacts(tid)["artifacts"]] == [
        (2, "pending")
    ]
    blocks.gate.set()
    arts = wait_verified(bservice, tid)
    assert [(a["cycle"], a["sha256"]) for a in arts] == [(2, f"{2:064x}")]  # cycle 1 not recreated


def test_a_verification_error_marks_the_artifact_failed(bservice, blocks, monkeypatch):
    blocks.disks = ["vdb"]
    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
    start = _cmds(bservice, sid)[0]
    tid = start["params"]["task_id"]

    def broken(self, disk, cycle):
        raise OSError(5, "Input/output error")

    working = FakeBlockStore.verify_generation
    monkeypatch.setattr(FakeBlockStore, "verify_generation", broken)
    _ack(bservice, sid, start)
    (art,) = wait_verified(bservice, tid)
    assert art["sha256"] is None and art["report"]["state"] == "failed"
    assert "Input/output error" in art["report"]["error"]
    # the next start of the server tries again
    monkeypatch.setattr(FakeBlockStore, "verify_generation", working)
    assert bservice.start() == 1
    (art,) = wait_verified(bservice, tid)
    assert art["sha256"] == f"{1:064x}" and art["report"]["state"] == "verified"


def test_image_export_finds_the_task_disk_and_cycle_through_the_repositories(bservice, store, tmp_path):
    """``image export`` reads the committed cycles from the server's database through the
    repositories, so it works on SQLite and on PostgreSQL (tests/integration/test_postgres.py runs
    this module on PostgreSQL): the newest committed cycle by default, clear errors naming the
    committed cycles and the disks."""
    from go2cloud_server.errors import NotFound
    from go2cloud_server.imageexport import ExportRequest, _choose

    sid = _source(bservice)
    bservice.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb", "/srv/disk.img"],
                              "keep_images": 3}, source=sid)
    start = _cmds(bservice, sid)[0]
    tid = start["params"]["task_id"]
    _ack(bservice, sid, start)
    bservice.migration_action("sync", source=sid)
    _ack(bservice, sid, _cmds(bservice, sid)[0])
    assert sorted({a["cycle"] for a in wait_verified(bservice, tid)}) == [1, 2]

    def req(**kw):
        return ExportRequest(data_dir=tmp_path, source=sid, out=tmp_path / "out.img", **kw)

    chosen = _choose(store, req(disk="vdb"))
    assert (chosen.task, chosen.disk, chosen.cycle) == (tid, "vdb", 2)
    assert _choose(store, req(disk="disk.img", cycle=1)).cycle == 1
    with pytest.raises(InvalidInput, match="give --disk .one of: disk.img, vdb"):
        _choose(store, req())
    with pytest.raises(NotFound, match="committed cycles: 1, 2"):
        _choose(store, req(disk="vdb", cycle=5))
    with pytest.raises(NotFound, match="its disks: disk.img, vdb"):
        _choose(store, req(disk="sda"))
    with pytest.raises(NotFound, match="is unknown"):
        _choose(store, ExportRequest(data_dir=tmp_path, source="s-nope", out=tmp_path / "o"))
