"""After a takeover, the next block cycle re-reads and verifies everything (issue 17, item 1;
docs/reliability.md section 1).

The fault: an incremental block cycle sends only what changed since the base its agent knows
(the snapshot driver's change tracking, or the chunk hashes of its manifest). After another
session took the lease over (epoch 2), the target holds writes the new holder never made:
chunks the old holder sent in the interrupted pass. The cycle those writes belong to is refused
verification (``mixed_sessions``), but the *next* cycle, written by one session only, would keep
them (unchanged per the new holder's tracking) and be marked verified while its image differs
from the disk.

Here everything is real: the reflink snapshot backend's change tracking on a loop XFS, the
agent killed with ``kill -9``, the clone of its home (tests/faults/fence_clone.py: same machine,
another machine id, so the lease passes to epoch 2). The clone's disk is the machine's disk as it
was at cycle 1 (a VM cloned from that state): a reflink copy put at the disk's path.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.faults.fence_clone import CloneAgent, copy_home
from tests.integration.test_e2e_block import (
    artifacts_by_cycle,
    assert_generation_equals,
    change_some,
    fill,
    import_agent,
    make_fs,
    mid_pass,
    mounted,
    reflink_xfs,  # noqa: F401 - a fixture
    sha256,
    task,
    wait_cycle,
)
from tests.support.harness import wait_for

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("takeover fault tests need root (loop devices, mount namespaces)", allow_module_level=True)


def epoch_of(server, sid: str) -> int:
    return int((server.show_source(sid).get("session") or {}).get("epoch") or 0)


def test_after_a_takeover_the_next_cycle_equals_the_disk_and_is_verified(
        server, agents, tmp_path, reflink_xfs):  # noqa: F811 - the fixture
    disk = reflink_xfs / "vm-disk.img"
    make_fs(disk, "ext4")
    with mounted(disk, tmp_path / "mnt") as mnt:
        fill(mnt, seed=11)
    agent, sid = import_agent(server, agents, "takeover")
    wait_for(lambda: epoch_of(server, sid) == 1, 30, "the first agent's session")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "reflink", "--no-drill")
    assert_generation_equals(wait_cycle(server, sid, 1), disk)

    # the state a clone of this machine will have: the disk as of cycle 1
    as_of_cycle_1 = reflink_xfs / "as-of-cycle-1.img"
    subprocess.run(["cp", "--reflink=always", "--", str(disk), str(as_of_cycle_1)], check=True)
    with mounted(disk, tmp_path / "mnt") as mnt:
        change_some(mnt, seed=12, fraction=0.6)
    assert sha256(disk) != sha256(as_of_cycle_1)
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "16")
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: mid_pass(server, sid) and (task(server, sid)["progress"]["disks"][0]["bytes_sent"] or 0)
             > 2 * 1024 * 1024, 120, "the first agent's cycle 2 mid-pass", interval=0.1)
    agent.kill()  # kill -9: it sent part of cycle 2 (its disk's new data)

    # the clone: a copy of the home, the machine's disk as of cycle 1, another machine id
    home = copy_home(agent.home, tmp_path / "home-clone")
    os.replace(as_of_cycle_1, disk)
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    clone = CloneAgent(home, server, tmp_path / "clone", machine_id="e3" * 16).start()
    try:
        wait_for(lambda: epoch_of(server, sid) == 2, 60, "the clone's takeover (epoch 2)")

        def cycle_2_done() -> bool:
            done = task(server, sid)["status"] in ("pending", "failed")
            return done and 2 in artifacts_by_cycle(server, sid)

        wait_for(cycle_2_done, 180, "cycle 2 committed by the clone", interval=0.5)
        art2 = artifacts_by_cycle(server, sid)[2]
        assert art2["report"]["error_code"] == "mixed_sessions", art2  # two sessions wrote it
        server.j("migration", "sync", "--source", sid)
        art3 = wait_cycle(server, sid, 3)  # verified, or this fails
        assert_generation_equals(art3, disk)  # bit for bit the clone's disk
        assert art3["report"]["state"] == "verified"
        # the clone's first cycle (2, resumed at epoch 2) was the verification pass, said so, and
        # re-sent only what differed; cycle 3 (its base written under epoch 2) is incremental again
        out = clone.output()
        assert "Cycle 2 is a verification pass" in out and "Cycle 3 is a verification pass" not in out, out
        assert art2["report"]["state"] != "verified"
    finally:
        clone.stop()
