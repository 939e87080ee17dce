"""Fencing (docs/reliability.md, section 1): one live agent session per source identity.

The fault: a cloned machine (a copy of an imported agent's home, its own disk and machine id)
runs a second agent with the same identity. Before fencing both agents were accepted as one
source, both ran every command, and the block image matched neither disk while the server marked
it verified. Here the clone runs in its own mount namespace (tests/faults/fence_clone.py) against
the real server; the first agent's disk and the clone's disk are real ext4 images.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Dict

import pytest
import requests
import xxhash

from go2cloud_server import manifest
from tests.faults.fence_clone import CloneAgent, copy_home
from tests.integration.test_e2e_block import (
    artifacts_by_cycle,
    assert_generation_equals,
    image_with_data,
    import_agent,
    mid_pass,
    sha256,
    wait_cycle,
)
from tests.support.harness import wait_for

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("fencing fault tests need root (mount namespaces, loop devices)", allow_module_level=True)

CLONE_EXIT = 26  # go2cloud_client.errors.SessionConflictError


def session_of(server, sid: str) -> Dict[str, Any]:
    return server.show_source(sid).get("session") or {}


def db(server) -> sqlite3.Connection:
    conn = sqlite3.connect(str(server.data_dir / "server.db"), timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def task_secrets(server, task_id: str) -> Dict[str, Any]:
    """The task's target credentials as the agent gets them (read from the server's database:
    the operator CLI never shows them)."""
    with db(server) as conn:
        row = conn.execute("SELECT block_token, rsync_password, current_cycle FROM tasks WHERE id = ?",
                           (task_id,)).fetchone()
    return dict(row)


def _pinned(server) -> requests.Session:
    """A raw protocol probe, pinned to the server's certificate like the agent."""
    from go2cloud_client.tlspin import https_adapter

    s = requests.Session()
    s.mount("https://", https_adapter(server.fingerprint))
    return s


def test_cloned_home_is_refused_and_the_image_equals_the_first_agents_disk(server, agents, tmp_path):
    disk = image_with_data(tmp_path, "ext4", "disk.img", seed=1)
    other = image_with_data(tmp_path, "ext4", "clone-disk.img", seed=7)  # the clone's own disk
    assert sha256(disk) != sha256(other)
    agent, sid = import_agent(server, agents, "fence")
    wait_for(lambda: session_of(server, sid).get("epoch") == 1, 30, "the first agent's session")

    clone = CloneAgent(copy_home(agent.home, tmp_path / "home-clone"), server, tmp_path / "clone",
                       machine_id="c1" * 16, disk_path=disk, disk_over=other).start()
    try:
        # the migration is started while the clone is up: its commands must go to the holder only
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
                 "--snapshot", "live", "--no-drill")
        rc = clone.wait(timeout=120)
    finally:
        clone.stop()
    out = clone.output()
    assert rc == CLONE_EXIT, out
    assert "another live agent holds the session" in out or "another agent holds the session" in out, out
    assert "--abort" in out and "clone" in out, out
    assert "Import Source Server" not in out

    art = wait_cycle(server, sid, 1)
    assert_generation_equals(art, disk)  # bit for bit the first agent's disk, never the clone's
    assert art["sha256"] != sha256(other)
    assert agent.proc is not None and agent.proc.poll() is None, "the first agent must keep working"
    assert session_of(server, sid)["epoch"] == 1

    shown = server.show_source(sid)
    warning = shown["clone_warning"]
    assert warning["code"] == "session_conflict" and "--abort" in warning["message"], warning
    assert f"machine id {'c1' * 16}" in warning["message"] or "c1" * 16 in warning["message"], warning
    events = {e["code"]: e for e in shown["events"]}
    assert "session_conflict" in events and events["session_conflict"]["level"] == "warning"
    human = server.cli("source", "show", sid, json_out=False).stdout
    assert "clone" in human and "--abort" in human, human


def test_stale_epoch_on_a_block_chunk_is_refused_and_writes_nothing(server, agents, tmp_path):
    disk = image_with_data(tmp_path, "ext4", "disk.img", seed=3)
    agent, sid = import_agent(server, agents, "stale-block")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "live", "--no-drill")
    wait_cycle(server, sid, 1)
    task_id = server.source_migration(sid)["tasks"][0]["task_id"]
    token = task_secrets(server, task_id)["block_token"]
    epoch = session_of(server, sid)["epoch"]
    garbage = os.urandom(1 << 20)
    url = f"{server.url}/block/v1/tasks/{task_id}/disks/disk.img/chunks/0"
    base = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream",
            "X-Chunk-Size": str(1 << 20), "X-Disk-Size": str(disk.stat().st_size), "X-Encoding": "raw",
            "X-Chunk-Xxh3": xxhash.xxh3_128_digest(garbage).hex()}
    s = _pinned(server)
    for stale in ({}, {"X-Go2cloud-Epoch": str(epoch - 1)}, {"X-Go2cloud-Epoch": str(epoch + 1)}):
        resp = s.put(url, data=garbage, headers={**base, **stale}, timeout=30)
        assert resp.status_code == 409, (stale, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "stale_epoch"
    # nothing of it was written: the next cycle (the agent resends only what changed on its disk)
    # is still the source bit for bit
    server.j("migration", "sync", "--source", sid)
    art2 = wait_cycle(server, sid, 2)
    assert_generation_equals(art2, disk)


def test_stale_epoch_on_an_rsync_session_is_refused(server, agents, tmp_path):
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    for i in range(24):
        (src / "data" / f"f{i:02d}.bin").write_bytes(os.urandom(256 * 1024))
    server.j("workgroup", "create", "wg-stale-rsync")
    agent = agents("stale-rsync").start(code=server.new_code("wg-stale-rsync", uses=1))
    sid = agent.wait_imported()
    wait_for(lambda: session_of(server, sid).get("epoch") == 1, 30, "the agent's session")
    # slow enough (1 Mbit/s for 6 MiB) that the cycle is still being written when we knock
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "1", "--no-drill")
    task_id = server.wait_task(sid, "syncing")["task_id"]
    sec = wait_for(lambda: (lambda t: t if t["current_cycle"] else None)(task_secrets(server, task_id)),
                   30, "the open cycle")
    url = f"{server.url}/rsync/v1/tasks/{task_id}/session"
    s = _pinned(server)
    for stale in ({}, {"X-Go2cloud-Epoch": "0"}, {"X-Go2cloud-Epoch": "2"}):
        resp = s.post(url, timeout=30, headers={
            "Authorization": f"Bearer {sec['rsync_password']}", "Upgrade": "go2cloud-rsync",
            "Connection": "Upgrade", "X-Go2cloud-Cycle": str(sec["current_cycle"]),
            "X-Go2cloud-Path": str(src), **stale})
        assert resp.status_code == 409, (stale, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "stale_epoch"
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    server.wait_task(sid, "pending", timeout=120)
    assert manifest.build(server.artifact_tree(sid, src)) == manifest.build(src)


@pytest.mark.slow
def test_a_generation_written_by_two_sessions_is_never_verified(server, agents, tmp_path):
    """The first agent dies mid-pass; a clone of its home (another machine id, the same disk
    path) takes the lease over after it expired and finishes the cycle: two epochs wrote it."""
    disk = image_with_data(tmp_path, "ext4", "disk.img", seed=5)
    agent, sid = import_agent(server, agents, "mixed")
    wait_for(lambda: session_of(server, sid).get("epoch") == 1, 30, "the first agent's session")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "live", "--no-drill", "--bandwidth-mbps", "16")
    wait_for(lambda: mid_pass(server, sid), 120, "the first agent mid-pass", interval=0.1)
    agent.kill()  # the machine is gone; a VM cloned from its disk starts elsewhere
    home_copy = copy_home(agent.home, tmp_path / "home-clone")
    clone = CloneAgent(home_copy, server, tmp_path / "clone", machine_id="d2" * 16).start()
    try:
        wait_for(lambda: session_of(server, sid).get("epoch") == 2, 60, "the clone's takeover (epoch 2)")
        server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")

        def committed() -> bool:
            t = server.source_migration(sid)["tasks"][0]
            return 1 in artifacts_by_cycle(server, sid) and t["status"] in ("pending", "failed")

        wait_for(committed, 180, "cycle 1 committed", interval=0.5)
        art = artifacts_by_cycle(server, sid)[1]
        assert art["report"]["state"] == "failed" and art["report"]["error_code"] == "mixed_sessions", art
        assert art["sha256"] is None
        assert "epochs 1, 2" in art["report"]["error"]
        t = server.source_migration(sid)["tasks"][0]
        assert t["error"]["code"] == "mixed_sessions", t
        shown = server.cli("migration", "show", "--source", sid, json_out=False).stdout
        assert "mixed" in shown or "2 agent sessions" in shown, shown
    finally:
        clone.stop()
