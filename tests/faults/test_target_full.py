"""A full target is a task state, not an outage (docs/reliability.md, section 4).

A migration whose data does not fit on a tiny real ext4 filesystem (tests/support/tinyfs.py, loop
mounted): the control plane keeps answering while the target is full (heartbeats, the agent's
acknowledgement, ``code create``, ``source list``; not one 500 in the server's log), the task
shows ``target_full`` with the reason (free space, filesystem) in ``migration show`` and as an
event, and once the ballast is removed ("the operator freed space") the cycle resumes by itself,
or on ``migration sync``, and ends with an artifact equal to the source bit for bit, the earlier
cycle untouched.

Two layouts, as ``serve`` offers them: block mode with the database and the images on the one
full filesystem (the database's reserve keeps it writable), file mode with ``--target-dir`` on
the tiny filesystem and the database elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from go2cloud_server.manifest import build, diff
from tests.integration.conftest import AgentFactory
from tests.support import tree
from tests.support.blockimages import generation_sha256
from tests.support.harness import Server, wait_for
from tests.support.tinyfs import MiB, TinyFs, tiny_fs

pytestmark = [pytest.mark.integration, pytest.mark.root]

if os.geteuid() != 0:  # pragma: no cover - CI runs the fault tests as root
    pytest.skip("a full target needs a loop-mounted filesystem (root)", allow_module_level=True)


def excluded(rel: bytes, is_dir: bool) -> bool:
    """The agent's shipped default exclusions the tree exercises (/tmp/*, /var/tmp/*, /swapfile)."""
    return rel == b"swapfile" or rel.startswith(b"tmp/") or rel.startswith(b"var/tmp/")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def task(server: Server, sid: str) -> Dict[str, Any]:
    return server.source_migration(sid)["tasks"][0]


def wait_status(server: Server, sid: str, status: str, timeout: float = 90) -> Dict[str, Any]:
    def check() -> Any:
        t = task(server, sid)
        assert t["status"] != "failed", f"the task failed instead of {status}: {t['error']}"
        return t if t["status"] == status else None

    return wait_for(check, timeout, f"task of {sid} to be {status}", interval=0.3)


def commands(server: Server, kind: str) -> list:
    db = sqlite3.connect(f"file:{server.data_dir / 'server.db'}?mode=ro", uri=True)
    try:
        sql = "SELECT status, error_code FROM commands WHERE type = ? ORDER BY seq"
        return db.execute(sql, (kind,)).fetchall()
    finally:
        db.close()


def assert_control_plane_answers(server: Server, sid: str, fs: TinyFs) -> Dict[str, Any]:
    """While the target is full: the task shows target_full with the reason, an event says so,
    the agent's acknowledgement was taken, heartbeats go on, operator commands work."""
    t = task(server, sid)
    assert t["status"] == "target_full"
    assert t["error"]["code"] == "target_full"
    reason = t["error"]["message"]
    assert str(fs.mount_point) in reason and "free of" in reason and "ext4" in reason, reason
    assert "migration sync" in reason, reason
    shown = server.show_source(sid)
    assert any(e["code"] == "target_full" for e in shown["events"]), shown["events"]
    # the agent's acknowledgement of the cycle that met the full target went through
    wait_for(lambda: ("failed", "target_full") in commands(server, "sync"), 60,
             "the agent's target_full acknowledgement")
    # heartbeats are taken: the source's last-seen time moves on, and it is not offline
    seen = server.source(sid)["last_seen_at"]
    wait_for(lambda: server.source(sid)["last_seen_at"] != seen, 30, "a heartbeat taken while full")
    assert server.source(sid)["status"] == "target_full"
    code = server.new_code("wg-full", uses=1)
    assert code["token_id"].startswith("at-")
    return t


def no_server_errors(server: Server) -> None:
    log = (server.data_dir.parent / f"{server.data_dir.name}-serve.log").read_text(errors="replace")
    answered_500 = [line for line in log.splitlines() if "-> 500" in line]
    assert answered_500 == [], answered_500[:5]
    assert "Traceback" not in log


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[TinyFs]:
    with tiny_fs(tmp_path / "target.img", tmp_path / "target", size_mib=128) as fs:
        yield fs


def start(server_data: Path, tmp_path: Path, *args: str) -> Tuple[Server, AgentFactory]:
    server = Server(server_data, extra_args=list(args)).start()
    return server, AgentFactory(tmp_path, server)


def test_block_chunks_on_a_full_target_shared_with_the_database(tmp_path: Path, tiny: TinyFs) -> None:
    """Database and images on one full filesystem (the default layout, 16 MiB reserve): chunk
    writes meet ENOSPC; the control plane answers; freeing space resumes the cycle by itself."""
    server, agents = start(tiny.mount_point / "server", tmp_path, "--db-reserve", "16")
    try:
        disk = tmp_path / "disk.img"
        with open(disk, "wb") as fh:
            fh.write(os.urandom(8 * MiB))
            fh.truncate(64 * MiB)
        server.j("workgroup", "create", "wg-full")
        agent = agents("block").start(code=server.new_code("wg-full", uses=1))
        sid = agent.wait_imported()
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
                 "--snapshot", "live", "--compression", "0", "--keep-images", "5")
        wait_status(server, sid, "pending", timeout=120)
        gen1 = server.artifacts(sid)[0]
        gen1_sha = sha256(disk)
        assert sha256(Path(gen1["path"])) == gen1_sha

        tiny.fill(leave=12 * MiB)
        with open(disk, "r+b") as fh:  # 24 MiB of new data: twice what is left
            fh.seek(16 * MiB)
            fh.write(os.urandom(24 * MiB))
        server.j("migration", "sync", "--source", sid)
        wait_status(server, sid, "target_full")
        assert_control_plane_answers(server, sid, tiny)
        assert sha256(Path(gen1["path"])) == gen1_sha, "the full target changed the committed generation"

        tiny.free_ballast()
        wait_for(lambda: len(server.artifacts(sid)) == 2, 180, "cycle 2 after space returned", interval=0.5)
        wait_status(server, sid, "pending")
        wait_for(lambda: server.artifacts(sid)[1].get("sha256"), 120, "cycle 2 verified", interval=0.5)
        gen2 = server.artifacts(sid)[1]
        # on this ext4 target generation 2 is a delta: its whole image comes from image export
        assert gen2["cycle"] == 2 and gen2["sha256"] == sha256(disk) == generation_sha256(gen2)
        assert sha256(Path(gen1["path"])) == gen1_sha == server.artifacts(sid)[0]["sha256"]
        events = [e["code"] for e in server.show_source(sid)["events"]]
        assert "target_space_returned" in events, events
        assert (tiny.mount_point / "server" / "db-reserve").stat().st_size == 16 * MiB
        no_server_errors(server)
    finally:
        agents.close()
        server.stop()


def test_rsync_session_on_a_full_target_dir(tmp_path: Path, tiny: TinyFs) -> None:
    """Images on their own filesystem (``serve --target-dir``), the database elsewhere: an rsync
    session meets ENOSPC; the control plane answers; ``migration sync`` while still full stops at
    target_full again, harmlessly; when space returns the cycle resumes by itself, the artifact
    equal to the source by full manifest, the first image untouched."""
    server, agents = start(tmp_path / "server-data", tmp_path, "--target-dir", str(tiny.mount_point))
    try:
        src = tree.build(tmp_path / "source tree")
        server.j("workgroup", "create", "wg-full")
        agent = agents("file").start(code=server.new_code("wg-full", uses=1))
        sid = agent.wait_imported()
        server.j("migration", "start", "--source", sid, "--path", str(src), "--keep-images", "5")
        wait_status(server, sid, "pending", timeout=120)
        image1 = server.artifact_tree(sid, src, 0)
        assert str(image1).startswith(str(tiny.mount_point / "tasks")), image1
        m1 = build(image1)
        assert diff(build(src, exclude=excluded), m1) == []

        tiny.fill(leave=8 * MiB)
        big = src / "big"
        big.mkdir()
        for i in range(3):
            (big / f"blob{i}.bin").write_bytes(os.urandom(8 * MiB))
        tree.change_content(src)
        server.j("migration", "sync", "--source", sid)
        wait_status(server, sid, "target_full")
        assert_control_plane_answers(server, sid, tiny)
        assert diff(m1, build(image1)) == [], "the full target changed the committed image"

        # the operator syncs while it is still full: the cycle runs, meets the full target again
        server.j("migration", "sync", "--source", sid)
        wait_for(lambda: commands(server, "sync").count(("failed", "target_full")) == 2, 120,
                 "the second sync to stop at the full target")
        wait_status(server, sid, "target_full")

        tiny.free_ballast()
        wait_for(lambda: len(server.artifacts(sid)) == 2, 180, "cycle 2 after space returned", interval=0.5)
        wait_status(server, sid, "pending")
        assert diff(build(src, exclude=excluded), build(server.artifact_tree(sid, src, 1))) == []
        assert diff(m1, build(image1)) == [], "cycle 2 changed the image of cycle 1"
        no_server_errors(server)
    finally:
        agents.close()
        server.stop()
