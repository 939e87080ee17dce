from __future__ import annotations

import threading
import time

import pytest

from go2cloud_client.backoff import Backoff
from go2cloud_client.commands import parse_command
from go2cloud_client.errors import ReplicationError
from go2cloud_client.replication.base import CycleResult, TransferCancelled
from go2cloud_client.task import TaskRunner

TARGET = {"kind": "rsync", "url": "https://127.0.0.1:8443/rsync/v1/tasks/t-1",
          "fingerprint": "sha256:" + "ab" * 32, "module": "t-1", "user": "t-1", "password": "pw"}


def isdir(path):
    return True


def cmd(cid, ctype, **params):
    return parse_command({"id": cid, "type": ctype, "params": {"task_id": "t-1", **params}}, isdir)


def start(cid="c-start", number=1, **over):
    params = {"mode": "file", "paths": ["/srv"], "bandwidth_mbps": 0, "compression": 7, "checksum": False,
              "target": TARGET, "cycle": {"number": number, "dest": f"{number:06d}", "link_dest": None}}
    params.update(over)
    return cmd(cid, "start", **params)


def cycle(n, link=None):
    return {"number": n, "dest": f"{n:06d}", "link_dest": link}


class FakeReplicator:
    """Blocks in run_cycle until released or cancelled; scripted failures."""

    def __init__(self, world, options, target):
        self.world, self.options, self.target = world, options, target

    def run_cycle(self, spec, cancel):
        w = self.world
        w.runs.append((spec, self.options, self.target))
        w.started.set()
        if w.failures:
            raise w.failures.pop(0)
        while not w.release.is_set():
            if cancel.wait(0.01):
                raise TransferCancelled()
        w.release.clear()
        return CycleResult(spec.number, 100, 50, 3, 1, "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z")


class World:
    def __init__(self, home):
        self.runs = []
        self.failures = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.acks = []
        self.fetches = []
        self.home = home

    def factory(self, *, target, paths, options, on_progress, on_child):
        return FakeReplicator(self, options, target)

    def fetch(self, task_id):
        self.fetches.append(task_id)
        return {"task_id": task_id, "mode": "file", "paths": ["/srv"], "bandwidth_mbps": 0, "compression": 7,
                "checksum": False, "target": dict(TARGET, password="fetched"), "status": "syncing"}

    def ack(self, cid, status, code, message, result):
        self.acks.append((cid, status, code, result))

    def runner(self):
        return TaskRunner(self.home, replicator_factory=self.factory, fetch_task=self.fetch, ack=self.ack,
                          backoff=Backoff(initial=0.001, factor=1, cap=0.001, jitter=0), isdir=isdir)

    def wait_started(self, n):
        deadline = time.monotonic() + 5
        while len(self.runs) < n:
            assert time.monotonic() < deadline, "replicator not started"
            time.sleep(0.01)

    def wait_acks(self, n):
        deadline = time.monotonic() + 5
        while len(self.acks) < n:
            assert time.monotonic() < deadline, f"acks: {self.acks}"
            time.sleep(0.01)


@pytest.fixture
def world(home):
    return World(home)


def test_start_then_success_acks_result_and_waits(world, home):
    r = world.runner()
    assert r.handle(start()) is None
    world.wait_started(1)
    assert r.snapshot()["phase"] == "full_sync" and r.snapshot()["state"] == "running"
    assert world.runs[0][0].incremental is False
    assert "pw" not in home.task_file.read_text()
    world.release.set()
    world.wait_acks(1)
    cid, status, _, result = world.acks[0]
    assert (cid, status) == ("c-start", "succeeded")
    assert result["cycle"] == 1 and result["bytes_total"] == 100 and result["files"] == 3
    snap = r.snapshot()
    assert snap["phase"] == "waiting" and snap["cycle"] == 1
    assert home.read_state(home.task_file)["status"] == "waiting"


def test_sync_fetches_target_and_is_incremental(world):
    r = world.runner()
    r.handle(start())
    world.release.set()
    world.wait_acks(1)
    assert r.handle(cmd("c-sync", "sync", cycle=cycle(2, "000001"))) is None
    world.wait_started(2)
    spec, _, target = world.runs[1]
    assert spec.incremental and spec.link_dest == "000001"
    assert target.password == "fetched" and world.fetches == ["t-1"]
    world.release.set()
    world.wait_acks(2)
    assert world.acks[1][:2] == ("c-sync", "succeeded")


def test_sync_while_running_is_busy(world):
    r = world.runner()
    r.handle(start())
    world.wait_started(1)
    out = r.handle(cmd("c-sync", "sync", cycle=cycle(2)))
    assert out.status == "failed" and out.error_code == "task_busy"
    r.shutdown()


def test_pause_keeps_cycle_and_resume_reruns_it(world, home):
    r = world.runner()
    r.handle(start())
    world.wait_started(1)
    out = r.handle(cmd("c-pause", "pause"))
    assert out.status == "succeeded"
    assert r.snapshot()["state"] == "paused" and not r.is_running()
    assert home.read_state(home.task_file)["cycle"]["number"] == 1
    assert world.acks == []  # the start command is still in progress
    assert r.handle(cmd("c-pause2", "pause")).message == "already paused"
    out = r.handle(cmd("c-resume", "resume"))
    assert out.status == "succeeded"
    world.wait_started(2)
    assert world.runs[1][0].number == 1 and world.runs[1][2].password == "fetched"
    world.release.set()
    world.wait_acks(1)
    assert world.acks[0][:2] == ("c-start", "succeeded")


def test_modify_restarts_transfer_with_new_options(world, home):
    r = world.runner()
    r.handle(start())
    world.wait_started(1)
    out = r.handle(cmd("c-mod", "modify", bandwidth_mbps=10, compression=0))
    assert out.status == "succeeded"
    world.wait_started(2)
    assert world.runs[1][1].bandwidth_mbps == 10 and world.runs[1][1].compression == 0
    assert world.runs[1][0].number == 1
    assert home.read_state(home.task_file)["options"]["bandwidth_mbps"] == 10
    world.release.set()
    world.wait_acks(1)
    assert world.acks == [("c-start", "succeeded", None, world.acks[0][3])]


def test_abort_cancels_acks_pending_and_forgets(world, home):
    r = world.runner()
    r.handle(start())
    world.wait_started(1)
    out = r.handle(cmd("c-abort", "abort"))
    assert out.status == "succeeded"
    assert world.acks == [("c-start", "failed", "task_aborted", {})]
    assert not home.task_file.exists() and r.task is None
    assert r.handle(cmd("c-abort2", "abort")).status == "succeeded"  # idempotent


def test_finalize_with_cycle_completes_and_forgets(world, home):
    r = world.runner()
    r.handle(start())
    world.release.set()
    world.wait_acks(1)
    assert r.handle(cmd("c-fin", "finalize", cycle=cycle(2, "000001"))) is None
    world.wait_started(2)
    assert r.snapshot()["phase"] == "final_sync"
    world.release.set()
    world.wait_acks(2)
    assert world.acks[1][:2] == ("c-fin", "succeeded")
    assert r.snapshot()["state"] == "completed" and not home.task_file.exists()


def test_finalize_without_cycle_just_finishes(world, home):
    r = world.runner()
    r.handle(start())
    world.release.set()
    world.wait_acks(1)
    out = r.handle(cmd("c-fin", "finalize", cycle=None))
    assert out.status == "succeeded" and r.task is None and r.snapshot()["state"] == "completed"


def test_transient_errors_retried_then_permanent_failure_acked(world, home):
    r = world.runner()
    transient = ReplicationError("network blip")
    permanent = ReplicationError("disk on fire")
    permanent.retryable = False
    world.failures = [transient, permanent]
    r.handle(start())
    world.wait_acks(1)
    assert len(world.runs) == 2
    assert world.acks[0] == ("c-start", "failed", "replication_failed", {})
    snap = r.snapshot()
    assert snap["state"] == "failed" and snap["last_error"]["message"] == "disk on fire"


def test_transient_error_exhausts_the_retry_budget(world):
    r = world.runner()
    r.retry_budget_s = 0  # spent at the first failure: the cycle fails, saying why
    world.failures = [ReplicationError("x"), ReplicationError("y")]
    r.handle(start())
    world.wait_acks(1)
    assert len(world.runs) == 1 and world.acks[0][1] == "failed"
    assert "gave up after" in r.snapshot()["last_error"]["message"]


def test_restart_resumes_interrupted_cycle_but_not_paused(world, home):
    r = world.runner()
    r.handle(start())
    world.wait_started(1)
    r.shutdown()  # agent stops: the task stays "running"
    r2 = world.runner()
    r2.load()
    world.wait_started(2)
    assert world.runs[1][2].password == "fetched"
    assert r2.cycle_command() == "c-start"
    r2.handle(cmd("c-pause", "pause"))
    r3 = world.runner()
    r3.load()
    # load() decides at once (under its lock) whether to start a worker: none was started
    assert not r3.is_running()
    assert len(world.runs) == 2 and r3.snapshot()["state"] == "paused"


def test_commands_for_another_task(world):
    r = world.runner()
    out = r.handle(cmd("c-p", "pause"))
    assert out.status == "failed" and out.error_code == "task_unknown"
    r.handle(start())
    world.wait_started(1)
    other = parse_command({"id": "c-x", "type": "start", "params": {**start().__dict__["changes"], **{
        "task_id": "t-2", "mode": "file", "paths": ["/srv"], "bandwidth_mbps": 0, "compression": 7,
        "checksum": False, "target": TARGET, "cycle": cycle(1)}}}, isdir)
    out = r.handle(other)
    assert out.status == "failed" and out.error_code == "task_busy"
    r.shutdown()
