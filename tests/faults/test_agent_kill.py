"""``kill -9`` of the AGENT at a random point of a transfer, then the agent started again with the
same home as a service manager would (issue 17, item 8; docs/reliability.md section 8). The
server side is tests/faults/test_server_restart.py and test_server_kill_block.py.

Real server, agent, rsync and block receiver on loopback. The agent is killed when the transfer
passes a random fraction (seeded) of the source; nobody gives a command after the restart. Every
case must end with the artifact equal to the source (full tree manifest, or sha256 of the disk)
and with bounded re-sends:

* file level: rsync keeps partial files (``--partial``) and skips the files already on the
  target, so what the killed run delivered plus what the restarted run sent (rsync's own
  "Total bytes sent") stays under 1.5x the tree, and the restarted run sends about what was
  missing;
* block level: the engine journals every chunk the target acknowledged; the restarted pass
  resumes from the journal, sends no chunk the journal has, and the chunks the target had
  received but the journal had not (sent twice) are counted from the target's ``current.img``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator

import pytest

from go2cloud_server.manifest import build, diff
from tests.faults.kill_harness import (
    Journal,
    RestartableAgent,
    block_committed,
    chunks_equal,
    data_chunks,
    find_current_image,
    find_journal,
    rsync_done,
    stable_bytes,
    tree_bytes,
)
from tests.faults.server_harness import kill_at_random_point
from tests.support.harness import Server

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
def killable(tmp_path: Path, server: Server) -> Iterator[RestartableAgent]:
    server.j("workgroup", "create", "wg-kill")
    agent = RestartableAgent(tmp_path / "home", server)
    agent.start(code=server.new_code("wg-kill", uses=1))
    yield agent
    try:
        agent.stop()
    finally:
        agent.kill()


def _source_tree(root: Path, seed: int) -> int:
    """32 MiB of incompressible data: 16 files of 1 MiB around one of 16 MiB (a kill lands in a
    file being written half the time), a few small files in a subdirectory."""
    rnd = random.Random(seed)
    root.mkdir()
    for i in range(8):
        (root / f"a{i:02d}.bin").write_bytes(rnd.randbytes(MIB))
    (root / "m-big.bin").write_bytes(rnd.randbytes(16 * MIB))
    for i in range(8):
        (root / f"z{i:02d}.bin").write_bytes(rnd.randbytes(MIB))
    (root / "sub" / "deeper").mkdir(parents=True)
    for i in range(20):
        (root / "sub" / "deeper" / f"t{i}.txt").write_text(f"small file {i}\n" * (i + 1))
    return tree_bytes(root)


def _kill_9_mid_file_pass(server: Server, agent: RestartableAgent, tmp_path: Path, seed: int) -> None:
    src = tmp_path / "src"
    size = _source_tree(src, seed)
    sid = agent.wait_imported()
    # 40 Mbit/s: ~7 s for the tree, long enough to land the kill anywhere in it
    server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill",
             "--bandwidth-mbps", "40", "--compression", "0")
    on_target = server.data_dir / "tasks"
    point = kill_at_random_point(agent.kill9, lambda: tree_bytes(on_target) / size, 0.15, 0.8,
                                 random.Random(seed))
    # nothing of the killed agent goes on sending: rsync and its tunnel end with it (before the
    # fix rsync went on and delivered the rest of the tree while the restarted agent ran it again)
    assert agent.child_sessions, "no rsync of the agent was running at the kill"
    agent.wait_no_leftovers(10)
    delivered = stable_bytes(on_target)
    assert delivered < size, "the kill came after the whole tree was on the target"
    assert rsync_done(agent.log_text(), 1) == [], "the killed run finished its path before the kill"

    agent.restart()  # same home, no code, no operator command
    task = server.wait_task(sid, "pending", timeout=240)
    assert task["last_committed_cycle"] == 1
    image = server.artifact_tree(sid, src)
    assert diff(build(src), build(image)) == []

    done = rsync_done(agent.log_text(), 1)
    assert len(done) == 1 and done[0][0].rstrip("/") == str(src), done
    sent_after = done[0][2]
    total = delivered + sent_after
    resent = total - size
    print(f"file pass (seed {seed}): agent killed at {point:.0%}, {delivered / MIB:.1f} MiB on the "
          f"target; the restarted run sent {sent_after / MIB:.1f} MiB; in all {total / size:.2f}x "
          f"the tree ({size / MIB:.1f} MiB), re-sent {resent / MIB:+.2f} MiB")
    assert total < 1.5 * size, f"{total} bytes sent for a tree of {size}"
    # the restarted run sends what was missing (plus rsync's file list and checksums), not the tree
    assert sent_after <= size - delivered + MIB + size // 50, (sent_after, size, delivered)
    assert "Traceback" not in agent.output()


def test_kill_9_of_the_agent_mid_file_pass_resumes_unattended(server, killable, tmp_path):
    _kill_9_mid_file_pass(server, killable, tmp_path, seed=31)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [32, 33, 34, 35])
def test_kill_9_of_the_agent_mid_file_pass_resumes_unattended_more_points(server, killable, tmp_path, seed):
    _kill_9_mid_file_pass(server, killable, tmp_path, seed=seed)


# -- block level ---------------------------------------------------------------------------------
def _block_fraction(server: Server, sid: str, data_bytes: int) -> float:
    """The part of the disk's data the agent reports sent (compression off: the chunks' bytes).
    Not ``bytes_done``: the holes after the last data are done in one report, and the progress
    jumps from about half to done."""
    tasks = server.source_migration(sid)["tasks"]
    disks = ((tasks[0].get("progress") or {}).get("disks") or []) if tasks else []
    if tasks and tasks[0].get("last_committed_cycle"):
        raise AssertionError("the pass was committed before the kill point")
    if not disks:
        return 0.0
    return float(disks[0].get("bytes_sent") or 0) / data_bytes


#: chunks the target may have acknowledged that the journal of a process killed -9 does not hold:
#: the batches in flight (the journal is written when the target acknowledged a batch); measured 0-4
RESENT_SLACK = 16


def _kill_9_mid_block_pass(server: Server, agent: RestartableAgent, tmp_path: Path, seed: int) -> None:
    from tests.integration.test_e2e_block import assert_generation_equals, image_with_data, wait_cycle

    disk = image_with_data(tmp_path, "ext4", seed=seed)
    data_bytes = len(data_chunks(disk, MIB)) * MIB
    sid = agent.wait_imported()
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "live", "--no-drill", "--bandwidth-mbps", "40", "--compression", "0")
    point = kill_at_random_point(agent.kill9, lambda: _block_fraction(server, sid, data_bytes), 0.15, 0.8,
                                 random.Random(seed))
    agent.wait_no_leftovers(10)

    journal = Journal(find_journal(agent.home, disk.name))
    cs = journal.chunk_size
    count = -(-journal.disk_size // cs)
    data = data_chunks(disk, cs)
    current = find_current_image(server.data_dir, disk.name)
    # data chunks the target holds now, whole and right: sent by the killed run
    on_target = chunks_equal(disk, current, cs, data)
    assert journal.done and journal.done <= set(range(count))
    assert len(journal.done) < count, "the kill came after the pass was complete"
    assert data & journal.sent <= on_target, "the journal holds a chunk the target does not"
    unjournaled = on_target - journal.done  # acknowledged or written, not journaled: sent again

    agent.restart()  # same home, no code, no operator command
    art = wait_cycle(server, sid, 1, timeout=300)
    assert_generation_equals(art, disk)

    summary = block_committed(agent.log_text(), disk.name, 1)
    assert summary is not None, "no 'cycle 1 committed' line in the agent's log"
    sent_after = summary["sent"]
    print(f"block pass (seed {seed}): agent killed at {point:.0%}: {len(journal.done)} of {count} chunks "
          f"journaled ({len(data & journal.done)} of {len(data)} data chunks); the restarted pass "
          f"resumed {summary['resumed']} and sent {sent_after}; re-sent (on the target, not journaled) "
          f"{len(unjournaled)}")
    assert summary["chunks"] == count
    assert summary["resumed"] == len(journal.done), "the restarted pass did not resume from the journal"
    # no chunk the journal holds is sent again: at most what the journal did not have
    assert sent_after <= count - len(journal.done), (sent_after, count, len(journal.done))
    assert len(unjournaled) <= RESENT_SLACK, sorted(unjournaled)
    assert "Traceback" not in agent.output()


@pytest.fixture
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("block fault tests need root (loop devices)")


def test_kill_9_of_the_agent_mid_block_pass_resumes_unattended(server, killable, tmp_path, _root):
    _kill_9_mid_block_pass(server, killable, tmp_path, seed=41)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [42, 43, 44, 45])
def test_kill_9_of_the_agent_mid_block_pass_resumes_unattended_more_points(server, killable, tmp_path, _root,
                                                                           seed):
    _kill_9_mid_block_pass(server, killable, tmp_path, seed=seed)
