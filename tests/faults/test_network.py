"""File mode (and block mode) survive the network (issue 17, item 5; docs/reliability.md 5).

Every connection of the agent (API, rsync tunnel, block receiver) goes through the TCP fault
proxy (tests/support/faultproxy.py) in front of the real server; rsync, the server's rsync
daemon and the agent are real. Each case ends with the artifact equal to the source.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from go2cloud_server.manifest import build, diff
from tests.faults.agent_net import agent_log, count, proxied_env, random_tree, status, task, wait_cycle_done
from tests.support.harness import wait_for

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def proxied(tmp_path):
    yield from proxied_env(tmp_path)


def _file_equal(server, sid: str, src: Path) -> None:
    art = server.artifacts(sid)[-1]
    image = Path(art["path"]) / str(src).lstrip("/")
    assert diff(build(src), build(image)) == []


def _start_file(proxied, name: str, src: Path, config: str = "rsync_timeout_s: 5\n"):
    agent, sid = proxied.import_agent(name, config=config)
    proxied.server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill",
                     "--compression", "0")
    return agent, sid


def test_stall_ends_the_rsync_run_at_its_timeout_and_the_cycle_completes(proxied, tmp_path):
    """A stalled connection (no data, nothing closed) used to hang the cycle for as long as it
    lasted: rsync ran without --timeout. Now the run ends (exit 30) while the stall still
    lasts, and the retry after it completes the cycle."""
    src = random_tree(tmp_path / "src", files=6, size=MIB)
    proxied.proxy.throttle(600_000)
    agent, sid = _start_file(proxied, "stall", src)
    wait_for(lambda: proxied.proxy.bytes_forwarded > 2 * MIB, 120, "data flowing")
    proxied.proxy.stall()
    # still stalled: the run must end by itself, and be retried: rsync's --timeout=5 (exit 30)
    # or, when rsync's keep-alives still fit in the buffers before the stall, the tunnel's own
    # idle limit of twice that
    wait_for(lambda: ("exit 30" in agent_log(agent) or "the connection is stalled" in agent_log(agent))
             and "retrying in" in agent_log(agent), 90, "the stalled rsync run to time out")
    assert proxied.proxy.stalled
    proxied.proxy.passthrough()
    wait_cycle_done(proxied.server, sid, 1, timeout=240)
    _file_equal(proxied.server, sid, src)


def test_resets_every_few_seconds_do_not_fail_the_cycle(proxied, tmp_path):
    """Resets every 3 s failed the cycle after 3 tries; retries now run under a time budget,
    partial files are kept, and the cycle completes equal to the source."""
    src = random_tree(tmp_path / "src", files=5, size=2 * MIB, seed=2)
    proxied.proxy.throttle(1_000_000)
    agent, sid = _start_file(proxied, "resets", src)
    wait_for(lambda: proxied.proxy.bytes_forwarded > MIB, 120, "data flowing")
    proxied.proxy.reset_every(3)
    wait_for(lambda: count(r"retrying in", agent_log(agent)) >= 4, 180, "four retries")
    wait_cycle_done(proxied.server, sid, 1, timeout=600)
    proxied.proxy.passthrough()
    assert proxied.proxy.resets >= 4
    _file_equal(proxied.server, sid, src)
    assert "Traceback" not in agent_log(agent)


def test_transient_failure_is_retried_automatically_and_visible_in_status(proxied, tmp_path):
    """The target away for a while: the cycle is not failed but retried, and status says so
    (the retry, its cause and its budget); when it is back the cycle completes."""
    src = random_tree(tmp_path / "src", files=4, size=MIB, seed=3)
    proxied.proxy.throttle(500_000)
    agent, sid = _start_file(proxied, "auto", src)
    wait_for(lambda: proxied.proxy.bytes_forwarded > MIB, 120, "data flowing")
    proxied.proxy.down()
    retry = wait_for(lambda: status(agent).get("retry"), 90, "the retry shown in status.json")
    # the tunnel's refusal reaches the agent as an rsync exit outside RETRYABLE_CODES (generic
    # replication_failed); either way it is retried under the budget
    assert retry["code"] in ("rsync_connection_failed", "replication_failed") and retry["budget_s"] >= 1800
    out = agent.run_cli("status").stdout
    assert "Retrying:   attempt" in out, out
    proxied.proxy.up()
    proxied.proxy.passthrough()
    wait_cycle_done(proxied.server, sid, 1, timeout=300)
    assert task(proxied.server, sid)["status"] != "failed"
    _file_equal(proxied.server, sid, src)
    wait_for(lambda: status(agent).get("retry") is None, 30, "the retry cleared")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["file", "block"])
def test_control_plane_away_three_minutes_mid_cycle(proxied, tmp_path, mode):
    """The control plane (API and data: one port) away for 3 minutes in the middle of a cycle
    used to fail it after ~2.5 min in both modes, and nothing resumed it. Now the cycle waits
    (control-plane budget 1 h), the acknowledgement is queued, and it completes unattended."""
    agent, sid = proxied.import_agent(f"away-{mode}")
    proxied.proxy.throttle(400_000)
    if mode == "file":
        src = random_tree(tmp_path / "src", files=6, size=MIB, seed=4)
        proxied.server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill",
                         "--compression", "0")
    else:
        import random

        src = tmp_path / "disk.img"
        src.write_bytes(random.Random(5).randbytes(12 * MIB))
        proxied.server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(src),
                         "--snapshot", "live", "--no-drill", "--compression", "0")
    wait_for(lambda: proxied.proxy.bytes_forwarded > 2 * MIB, 180, "data flowing")
    proxied.proxy.down()
    time.sleep(180)  # the fault itself: three minutes without the control plane
    proxied.proxy.up()
    proxied.proxy.passthrough()
    art = wait_cycle_done(proxied.server, sid, 1, timeout=600)
    if mode == "file":
        _file_equal(proxied.server, sid, src)
    else:
        assert _sha256(Path(art["path"])) == _sha256(src)
    log = agent_log(agent)
    assert count("control plane unreachable", log) <= 2, "the outage is logged once, not every 2 s"
