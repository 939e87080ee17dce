"""Block-mode commands and cycles on the agent: validation, snapshots around the engine (choice,
change tokens, release on every way out, fsfreeze for a final pass of a mounted filesystem),
recover/purge of the snapshots a killed agent left, and the task runner's block path."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from go2cloud_client.backoff import Backoff
from go2cloud_client.commands import BlockTargetSpec, CycleSpec, DiskSpec, Options, parse_command
from go2cloud_client.errors import CommandRejectedError, ReplicationError, SnapshotFailedError
from go2cloud_client.replication.base import CycleResult, PathProgress, Progress, TransferCancelled
from go2cloud_client.replication.block.cycle import (
    BlockCycleRunner,
    BlockProgress,
    SnapshotWorkdirs,
    recover_snapshots,
)
from go2cloud_client.task import TaskRunner

BACKENDS = ("live", "fsfreeze", "reflink", "btrfs", "lvm")
TARGET = {"kind": "block", "url": "https://127.0.0.1:8443/block/v1/tasks/t-1", "token": "s3cr3t-xyz",
          "fingerprint": "sha256:" + "ab" * 32}


def block_start(cid="c-start", **over):
    params = {"task_id": "t-1", "mode": "block", "disks": [{"name": "vdb", "path": "/dev/vdb"}],
              "snapshot": "auto", "bandwidth_mbps": 0, "compression": 7, "checksum": False,
              "target": TARGET, "cycle": {"number": 1, "dest": "000001", "link_dest": None}}
    params.update(over)
    return parse_command({"id": cid, "type": "start", "params": params}, isdisk=lambda p: p != "/missing",
                         backends=lambda: BACKENDS)


def test_block_start_is_validated():
    cmd = block_start()
    assert cmd.mode == "block" and cmd.disks == (DiskSpec("vdb", "/dev/vdb"),) and cmd.snapshot == "auto"
    assert isinstance(cmd.target, BlockTargetSpec) and "s3cr3t" not in repr(cmd.target)
    for over, field in (
        ({"disks": [{"name": "vdb", "path": "/missing"}]}, "disks[0].path"),
        ({"disks": [{"name": "../x", "path": "/dev/vdb"}]}, "disks[0].name"),
        ({"disks": [{"name": "a", "path": "dev/vdb"}]}, "disks[0].path"),
        ({"disks": [{"name": "a", "path": "/dev/vdb"}, {"name": "a", "path": "/dev/vdc"}]}, "disks"),
        ({"disks": []}, "disks"),
        ({"snapshot": "zfs"}, "snapshot"),
        ({"target": dict(TARGET, kind="rsync")}, "target.kind"),
        ({"target": dict(TARGET, url="http://x/block")}, "target.url"),
        ({"target": dict(TARGET, fingerprint="md5:1")}, "target.fingerprint"),
        ({"target": dict(TARGET, token="a\nb")}, "target.token"),
    ):
        with pytest.raises(CommandRejectedError, match=field.replace("[", r"\[").replace("]", r"\]")):
            block_start(**over)
    with pytest.raises(CommandRejectedError, match="snapshot driver is not installed"):
        parse_command({"id": "c", "type": "start", "params": {**block_start_params()}},
                      isdisk=lambda p: True, backends=lambda: ())


def block_start_params() -> Dict[str, Any]:
    return {"task_id": "t-1", "mode": "block", "disks": [{"name": "vdb", "path": "/dev/vdb"}],
            "snapshot": "live", "bandwidth_mbps": 0, "compression": 7, "checksum": False, "target": TARGET,
            "cycle": {"number": 1, "dest": "000001", "link_dest": None}}


def test_a_directory_is_not_a_disk(tmp_path):
    from go2cloud_client.commands import is_disk

    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    assert is_disk(str(img)) and not is_disk(str(tmp_path)) and not is_disk(str(tmp_path / "nope"))


# -- fakes of the snapshot driver and the engine -------------------------------------------------


class FakeSnap:
    def __init__(self, world: World, backend: str, volume: str, workdir: Path) -> None:
        self.world, self.backend, self.volume, self.workdir = world, backend, volume, workdir
        self.released = False
        self.n = len(world.created)

    def path(self) -> str:
        return f"/snap/{self.backend}/{self.n}"

    def token(self) -> Optional[str]:
        return f"{self.backend}:{self.n}" if self.backend != "live" else None

    def changed_since(self, token):
        self.world.asked.append(token)
        return [(0, 4096)]

    def check(self) -> None:
        if self.world.expired:
            raise RuntimeError("watchdog thawed")

    def release(self) -> None:
        self.released = True


class FakeBackend:
    def __init__(self, world: World, name: str) -> None:
        self.world, self.name = world, name

    def probe(self, volume=None):
        return type("P", (), {"usable": self.name in self.world.usable, "reason": "test"})()

    def create(self, volume, workdir):
        if self.world.fail_create:
            raise type("SnapshotError", (Exception,), {"retryable": False, "code": "bad_volume"})("no way")
        s = FakeSnap(self.world, self.name, volume, Path(workdir))
        self.world.created.append(s)
        return s

    def recover(self, workdir):
        self.world.recovered.append(Path(workdir))
        return ["thawed /mnt"]

    def purge(self, workdir):
        self.world.purged.append(Path(workdir))
        return ["dropped bases"]


class FakeRegistry:
    def __init__(self, world: World) -> None:
        self.world = world

    def names(self):
        return BACKENDS

    def get(self, name):
        return FakeBackend(self.world, name)


class FakeEngine:
    def __init__(self, world: World, **kw: Any) -> None:
        self.world, self.kw = world, kw
        self.options_set: List[Any] = []

    def set_options(self, options):
        self.options_set.append(options)

    def run_cycle(self, cycle, cancel):
        w = self.world
        w.runs.append((cycle, self.kw, [s for s in w.created if not s.released]))
        self.kw["on_progress"](Progress(100, 50, 40, 10.0, 5.0, [PathProgress("vdb", 100, 50, 40, 10.0, 5.0,
                                                                               "running", 30, "raw")]))
        w.extents.append(self.kw["changed_extents"]("vdb"))
        w.started.set()
        if w.failures:
            raise w.failures.pop(0)
        while not w.release.is_set():
            if cancel.wait(0.01):
                raise TransferCancelled()
        w.release.clear()
        return CycleResult(cycle.number, 100, 40, 1, 1, "a", "b")


class World:
    def __init__(self, home) -> None:
        self.home = home
        self.created: List[FakeSnap] = []
        self.recovered: List[Path] = []
        self.purged: List[Path] = []
        self.asked: List[Any] = []
        self.runs: List[Any] = []
        self.extents: List[Any] = []
        self.failures: List[Exception] = []
        self.engines: List[FakeEngine] = []
        self.usable = {"reflink"}
        self.mounted: Optional[tuple] = None
        self.fail_create = False
        self.expired = False
        self.release = threading.Event()
        self.started = threading.Event()
        self.acks: List[Any] = []
        self.progress: List[Any] = []

    def factory(self, **kw):
        e = FakeEngine(self, **kw)
        self.engines.append(e)
        return e

    def cycles(self) -> BlockCycleRunner:
        return BlockCycleRunner(self.home, replicator_factory=self.factory, registry=FakeRegistry(self),
                                mounted=lambda p: self.mounted)

    def runner(self) -> TaskRunner:
        return TaskRunner(self.home, replicator_factory=lambda **kw: None, fetch_task=self.fetch,
                          ack=self.ack, backoff=Backoff(initial=0.001, factor=1, cap=0.001, jitter=0),
                          block_cycles=self.cycles())

    def fetch(self, task_id):
        return {"task_id": task_id, "mode": "block", "disks": [{"name": "vdb", "path": "/dev/vdb"}],
                "bandwidth_mbps": 0, "compression": 7, "checksum": False, "target": TARGET,
                "status": "syncing"}

    def ack(self, cid, status, code, message, result):
        self.acks.append((cid, status, code, result))

    def wait(self, what, pred):
        deadline = time.monotonic() + 5
        while not pred():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)


@pytest.fixture
def world(home):
    return World(home)


def run(world: World, kind: str = "full", number: int = 1, tokens=None, snapshot="auto"):
    world.release.set()
    return world.cycles().run(
        task_id="t-1", cycle=CycleSpec(number, f"{number:06d}", None if number == 1 else f"{number - 1:06d}"),
        kind=kind, disks=[DiskSpec("vdb", "/dev/vdb")], snapshot=snapshot, tokens=tokens or {},
        target=BlockTargetSpec(TARGET["url"], "s3cr3t-xyz", TARGET["fingerprint"]), options=Options(),
        cancel=threading.Event(), on_progress=lambda p: world.progress.append(p.to_dict()))


def test_cycle_snapshots_reads_the_snapshot_and_releases(world, home):
    result, tokens = run(world)
    (snap,) = world.created
    assert snap.backend == "reflink" and snap.released  # auto: first usable by probe()
    cycle, kw, live = world.runs[0]
    assert cycle.number == 1 and cycle.incremental is False and live == [snap]
    assert kw["disks"] == [("vdb", "/snap/reflink/0")] and kw["state_dir"] == home.state_dir / "block" / "t-1"
    assert world.extents == [None]  # full pass: no changed extents
    assert tokens == {"vdb": {"backend": "reflink", "token": "reflink:0"}}
    assert result["cycle"] == 1 and result["snapshots"] == {"vdb": "reflink"}
    disk = world.progress[0]["disks"][0]
    assert disk == {"name": "vdb", "path": "/dev/vdb", "bytes_total": 100, "bytes_done": 50, "bytes_sent": 40,
                    "bytes_zero": 30, "rate_bps": 10.0, "eta_s": 5.0, "state": "running",
                    "compression": "raw"}
    # the work directory stays listed (bases live there) until the task is forgotten
    assert [e["backend"] for e in SnapshotWorkdirs(home).entries()] == ["reflink"]

    _, tokens2 = run(world, "incremental", 2, tokens)
    assert world.asked == ["reflink:0"] and world.extents[-1] == [(0, 4096)]
    assert world.runs[-1][0].incremental is True and tokens2["vdb"]["token"] == "reflink:1"
    # a token of another backend is not used
    run(world, "incremental", 3, tokens2, snapshot="live")
    assert world.created[-1].backend == "live" and world.extents[-1] is None


def test_auto_never_falls_back_to_a_backend_that_is_not_point_in_time(world):
    world.usable = {"live", "fsfreeze"}
    n = len(world.created)
    with pytest.raises(SnapshotFailedError) as err:
        run(world, "full", 1)
    text = str(err.value)
    assert "no point-in-time snapshot backend is usable for /dev/vdb" in text
    assert "--snapshot fsfreeze (consistent, but every writer" in text and "--snapshot live (crash-" in text
    assert len(world.created) == n  # nothing was snapshotted or read


def test_final_pass_of_a_mounted_live_disk_freezes(world):
    world.usable = set()
    world.mounted = ("/dev/loop3", "/mnt/data")
    run(world, "incremental", 2, snapshot="live")
    assert world.created[-1].backend == "live"  # not final: no freeze
    result, _ = run(world, "final", 3, snapshot="live")
    snap = world.created[-1]
    assert (snap.backend, snap.volume, snap.released) == ("fsfreeze", "/dev/loop3", True)
    assert result["snapshots"] == {"vdb": "fsfreeze"}
    world.mounted = None
    run(world, "final", 4, snapshot="live")
    assert world.created[-1].backend == "live"


def test_snapshots_are_released_on_errors_and_cancel(world):
    world.failures.append(ReplicationError("target down"))
    with pytest.raises(ReplicationError):
        run(world)
    assert all(s.released for s in world.created)
    world.expired = True
    with pytest.raises(ReplicationError, match="point in time"):
        run(world)
    assert all(s.released for s in world.created)
    world.expired = False
    world.fail_create = True
    with pytest.raises(SnapshotFailedError, match="no way"):
        run(world)
    assert world.recovered  # a failed create cleans up behind itself


def test_recover_and_purge_listed_workdirs(world, home):
    run(world)
    workdir = Path(SnapshotWorkdirs(home).entries()[0]["workdir"])
    assert workdir.is_dir()
    lines = recover_snapshots(home, FakeRegistry(world))
    assert world.recovered == [workdir] and "thawed /mnt" in lines[0]
    assert SnapshotWorkdirs(home).entries()  # recover keeps the work directory (bases)
    lines = recover_snapshots(home, FakeRegistry(world), purge=True)
    assert world.purged == [workdir] and not workdir.exists() and SnapshotWorkdirs(home).entries() == []
    assert recover_snapshots(home, None) == []  # nothing listed: the driver is not even imported


def test_block_progress_totals():
    p = BlockProgress(Progress(10, 5, 4, 1.0, None, [PathProgress("a", 10, 5, 4, 1.0, None, "done", 2)]),
                      {"a": "/dev/a"}).to_dict()
    assert p["bytes_zero"] == 2 and p["disks"][0]["path"] == "/dev/a" and p["paths"] == []


def test_runner_block_task_lifecycle(world, home):
    r = world.runner()
    assert r.handle(block_start()) is None
    world.wait("engine started", world.started.is_set)
    snap = r.snapshot()
    assert snap["phase"] == "full_sync" and snap["progress"]["disks"][0]["path"] == "/dev/vdb"
    task = home.read_state(home.task_file)
    assert task["mode"] == "block" and task["disks"] == [{"name": "vdb", "path": "/dev/vdb"}]
    assert "s3cr3t" not in home.task_file.read_text()

    # modify: set_options on the running engine, no restart
    mod = parse_command({"id": "c-mod", "type": "modify", "params": {"task_id": "t-1", "bandwidth_mbps": 5}})
    assert r.handle(mod).status == "succeeded"
    assert world.engines[0].options_set[-1].bandwidth_mbps == 5 and len(world.runs) == 1

    world.release.set()
    world.wait("ack", lambda: world.acks)
    assert world.acks[0][:2] == ("c-start", "succeeded")
    assert world.acks[0][3]["snapshots"] == {"vdb": "reflink"}
    world.wait("task file updated", lambda: home.read_state(home.task_file)["status"] == "waiting")
    tokens = home.read_state(home.task_file)["change_tokens"]
    assert tokens == {"vdb": {"backend": "reflink", "token": "reflink:0"}}
    assert all(s.released for s in world.created)

    # pause mid-pass releases the snapshot; resume takes a new one
    world.started.clear()
    sync = parse_command({"id": "c-sync", "type": "sync", "params": {
        "task_id": "t-1", "cycle": {"number": 2, "dest": "000002", "link_dest": "000001"}}})
    assert r.handle(sync) is None
    world.wait("sync started", world.started.is_set)
    assert world.asked == ["reflink:0"]
    pause = parse_command({"id": "c-p", "type": "pause", "params": {"task_id": "t-1"}})
    assert r.handle(pause).status == "succeeded"
    assert all(s.released for s in world.created)
    resume = parse_command({"id": "c-r", "type": "resume", "params": {"task_id": "t-1"}})
    world.started.clear()
    r.handle(resume)
    world.wait("resumed", world.started.is_set)
    assert len(world.created) == 3 and world.runs[-1][0].number == 2

    # abort: the engine stops, snapshots released, work directories purged, engine state removed
    (home.state_dir / "block" / "t-1").mkdir(parents=True, exist_ok=True)
    abort = parse_command({"id": "c-a", "type": "abort", "params": {"task_id": "t-1"}})
    assert r.handle(abort).status == "succeeded"
    assert all(s.released for s in world.created) and world.purged
    assert not (home.state_dir / "block" / "t-1").exists() and r.task is None
    assert ("c-sync", "failed", "task_aborted", {}) in world.acks
