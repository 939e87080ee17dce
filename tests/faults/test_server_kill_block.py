"""``kill -9`` of the server during a BLOCK-level pass (issue 17, items 2 and 8;
docs/reliability.md sections 2 and 8). The file-level case is tests/faults/test_server_restart.py.

Real server, agent and block receiver on loopback: the server is killed at a random point of the
pass (by the progress the agent reported), started again on the same data directory and port,
and the pass must complete unattended with the generation equal to the disk by sha256 (and
verified by the server's own check).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.faults.server_harness import RestartableServer, kill_at_random_point, processes_naming
from tests.integration.test_e2e_block import assert_generation_equals, image_with_data, wait_cycle
from tests.support.harness import Agent, wait_for

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("block fault tests need root (loop devices)", allow_module_level=True)


@pytest.fixture
def rserver(tmp_path: Path) -> Iterator[RestartableServer]:
    srv = RestartableServer(tmp_path / "server-data").start()
    yield srv
    srv.stop()


def _done_fraction(server: RestartableServer, sid: str, data_bytes: int) -> float:
    """The data sent so far over the disk's data (not bytes_done: that jumps over the holes at
    the end of the disk, so a point in the second half might never be seen before the pass ends;
    compression is off, so sent bytes are data bytes)."""
    tasks = server.source_migration(sid)["tasks"]
    disks = ((tasks[0].get("progress") or {}).get("disks") or []) if tasks else []
    if not disks:
        return 0.0
    return float(disks[0].get("bytes_sent") or 0) / float(data_bytes)


def _kill_9_mid_block_pass(rserver: RestartableServer, tmp_path: Path, seed: int) -> None:
    disk = image_with_data(tmp_path, "ext4", seed=seed)
    rserver.j("workgroup", "create", "wg-kb")
    agent = Agent(tmp_path / "home", rserver).start(code=rserver.new_code("wg-kb", uses=1))
    try:
        sid = agent.wait_imported()
        rserver.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
                  "--snapshot", "live", "--no-drill", "--bandwidth-mbps", "40", "--compression", "0")
        data_bytes = os.stat(disk).st_blocks * 512
        point = kill_at_random_point(rserver.kill9, lambda: _done_fraction(rserver, sid, data_bytes),
                                     0.15, 0.7, random.Random(seed))
        wait_for(lambda: not processes_naming(str(rserver.data_dir)), 10,
                 f"no process of the killed server (killed at {point:.0%})")
        started = time.monotonic()
        rserver.restart()
        print(f"block pass: server killed at {point:.0%}, restart up in {time.monotonic() - started:.1f} s")
        art = wait_cycle(rserver, sid, 1, timeout=300)  # committed and verified, unattended
        assert_generation_equals(art, disk)
        assert rserver.children() == {}
    finally:
        agent.kill()


def test_kill_9_mid_block_pass_then_restart_completes_unattended(rserver, tmp_path):
    _kill_9_mid_block_pass(rserver, tmp_path, seed=21)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [22, 23, 24])
def test_kill_9_mid_block_pass_then_restart_completes_unattended_more_points(rserver, tmp_path, seed):
    _kill_9_mid_block_pass(rserver, tmp_path, seed=seed)
