"""Bandwidth windows end to end: the real server and agent, a schedule whose edge (a minute
boundary in this host's local time, which is the source's) falls a few seconds into the transfer.

Block mode: the token bucket changes at the edge; the rate is measured from what the target
actually received (the allocated size of the receiver's ``current.img``, sampled by the test), in
1 s windows, and must be within 10% of the limit in force (a check of the limiter's correctness with
a generous margin, not of speed). File mode: rsync is restarted at the edge with the new
``--bwlimit`` (the event says so) and the image equals the source. ``migration show`` shows the
schedule and the limit in force.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from go2cloud_server.manifest import build, diff
from tests.support.harness import wait_for

pytestmark = [pytest.mark.integration]
MIB = 1 << 20


def edge_schedule(before: int, after: int) -> Tuple[str, float]:
    """A schedule whose limit is ``before`` until the next minute boundary and ``after`` from then
    on (for the rest of the day); returns it and the edge as POSIX time. Waits until 40-50 s into
    a minute so that the edge comes 10-20 s after the start."""
    now = datetime.now()
    if not 40 <= now.second < 50:
        wait = (40 - now.second) % 60
        time.sleep(wait - now.microsecond / 1e6 + 0.05)
        now = datetime.now()
    edge = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if edge.day != now.day:  # 23:59: the window of the next day would be tomorrow's; keep it simple
        pytest.skip("the edge would fall on midnight; run again")
    day = edge.strftime("%a")
    schedule = f"{day} {now:%H:%M}-{edge:%H:%M}={before},{day} {edge:%H:%M}-24:00={after}"
    return schedule, edge.timestamp()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def import_agent(server, agents, name: str):
    server.j("workgroup", "create", f"wg-{name}")
    agent = agents(name).start(code=server.new_code(f"wg-{name}", uses=1))
    return agent, agent.wait_imported()


def window_events(server, sid: str) -> List[str]:
    events = server.show_source(sid)["events"]
    return [e["message"] for e in events if e["code"] == "bandwidth_window"]


def task(server, sid: str) -> Dict[str, Any]:
    return server.source_migration(sid)["tasks"][0]


class Received:
    """Samples the bytes the target has received: the allocated size of its ``current.img``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples: List[Tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            found = list(self.root.rglob("current.img"))
            if found:
                try:
                    self.samples.append((time.time(), found[0].stat().st_blocks * 512))
                except FileNotFoundError:
                    pass

    def at(self, t: float) -> int:
        best = 0
        for ts, n in self.samples:
            if ts > t:
                break
            best = n
        return best

    def rates(self, start: float, end: float) -> List[float]:
        """Bytes per second in consecutive 1 s windows from ``start`` while they end before ``end``."""
        out = []
        t = start
        while t + 1 <= end:
            out.append(float(self.at(t + 1) - self.at(t)))
            t += 1
        return out


def test_block_limit_changes_at_the_window_edge(server, agents, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (block devices of the agent)")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(192 * MIB))  # incompressible: bytes sent = bytes received
    agent, sid = import_agent(server, agents, "bwblock")
    before, after = 24, 160  # 3 MB/s, then 20 MB/s (20 chunks of 1 MiB a second)
    schedule, edge = edge_schedule(before, after)
    recv = Received(server.data_dir)
    try:
        server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(image),
                 "--snapshot", "live", "--compression", "0", "--bandwidth-schedule", schedule)
        shown = server.cli("migration", "show", "--source", sid, json_out=False).stdout
        assert f"schedule {schedule}" in shown, shown
        wait_for(lambda: (task(server, sid).get("bandwidth_now") or {}).get("limit_mbps") == before, 30,
                 "the agent to report the limit before the edge")
        wait_for(lambda: time.time() > edge + 2, 40, "the edge")
        now = task(server, sid)["bandwidth_now"]
        wait_for(lambda: task(server, sid)["bandwidth_now"]["limit_mbps"] == after, 10,
                 f"the agent to report the limit after the edge ({now})")
        server.wait_task(sid, "pending", timeout=120)
    finally:
        recv.stop.set()
        recv.thread.join()
    art = server.artifacts(sid)[0]
    assert sha256(Path(art["path"])) == sha256(image)

    first = next(ts for ts, n in recv.samples if n > 0)
    done = next(ts for ts, n in recv.samples if n >= 192 * MIB - 4 * MIB)
    assert first + 3 < edge < done - 5, "the edge must fall well inside the pass"
    slow = recv.rates(first + 1, edge - 0.2)
    fast = recv.rates(edge + 1, done)
    print(f"before the edge: {[round(r / 1e6, 2) for r in slow]} MB/s; after: "
          f"{[round(r / 1e6, 2) for r in fast]} MB/s")
    # after the change: every 1 s window within 10% of the new limit (no burst); before it the
    # windows hold only a few 1 MiB chunks each, so only their mean is checked
    # (the first window after the change may be lower: the bucket carries the old rate's debt)
    limit = after * 125_000
    assert len(fast) >= 3 and all(r <= 1.10 * limit for r in fast), fast
    # the bucket may still carry the old rate's debt for the first windows after the edge (below
    # the limit, never above): from the third window on the rate is the new limit within 10%. One
    # window may fall short (never over): on a loaded 2-core machine the agent cannot always
    # read, hash and send 20 MB/s for a whole second (seen: one window at 15.7 MB/s), and a
    # limiter that is not reached is not at fault; a second short window fails the test
    steady = fast[2:]
    short = [r for r in steady if abs(r - limit) > 0.10 * limit]
    assert len(steady) >= 3 and len(short) <= 1 and all(r < limit for r in short), fast
    assert slow and abs(sum(slow) / len(slow) - before * 125_000) <= 0.15 * before * 125_000, slow
    events = window_events(server, sid)
    assert any(f"the limit is now {after} Mbit/s (was {before} Mbit/s" in m for m in events), events
    assert "Traceback" not in agent.output()


def test_file_mode_rsync_restarts_with_the_new_limit_at_the_edge(server, agents, tmp_path, _needs_rsync):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"big{i}.bin").write_bytes(os.urandom(16 * MIB))
    (src / "small.txt").write_text("hello\n")
    agent, sid = import_agent(server, agents, "bwfile")
    before, after = 8, 0  # 1 MB/s, then unlimited
    schedule, edge = edge_schedule(before, after)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-schedule", schedule)
    wait_for(lambda: (task(server, sid).get("bandwidth_now") or {}).get("limit_mbps") == before, 30,
             "the agent to report the limit before the edge")
    progress_at_edge: List[Any] = []
    wait_for(lambda: time.time() > edge - 0.5, 40, "the edge")
    progress_at_edge.append(task(server, sid).get("progress"))
    server.wait_task(sid, "pending", timeout=120)
    assert progress_at_edge[0] and task(server, sid)["cycle"] in (None, 1)
    events = window_events(server, sid)
    assert any("the limit is now unlimited (was 8 Mbit/s" in m and "rsync restarted" in m
               for m in events), events
    art = server.artifacts(sid)[0]
    assert diff(build(src), build(Path(art["path"]) / str(src).lstrip("/"))) == []
    shown = server.cli("migration", "show", "--source", sid, json_out=False).stdout
    assert "Bandwidth of" in shown and "now unlimited" in shown and schedule in shown, shown
    assert "Traceback" not in agent.output()
