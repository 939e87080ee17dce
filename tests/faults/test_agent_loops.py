"""Supervised agent loops and a full agent home (issue 17, items 4 and 6; docs/reliability.md 6).

The agent home is a tiny ext4 filesystem on a loop device; mid-task it is filled with a file,
a command arrives while it is full, then the file is removed. The command must run exactly
once, the task must complete equal to the source, and nothing may need an operator. The
server's command records (its SQLite database, read-only) are the witness.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from go2cloud_server.manifest import build, diff
from tests.faults.agent_net import agent_log, count, proxied_env, random_tree, status, wait_cycle_done
from tests.support.harness import wait_for

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LABEL = "i17-agent-home"


@pytest.fixture
def proxied(tmp_path):
    yield from proxied_env(tmp_path)


@pytest.fixture
def tiny_home(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop device, mount)")
    image = tmp_path / f"{LABEL}.img"
    mnt = tmp_path / "homefs"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(24 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt / "home"
    finally:
        # the agent's log and state live on the tiny filesystem: keep them for the report
        for sub in ("Logs", "state"):
            if (mnt / "home" / sub).is_dir():
                shutil.copytree(mnt / "home" / sub, tmp_path / f"kept-{sub}", dirs_exist_ok=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Filler:
    """Keeps a filesystem full until :meth:`free`: a ballast file allocated (fallocate) to the
    last block, then grown again every 20 ms. ext4 hands the blocks of a replaced file back when
    its journal commits, and the agent replaces its status file every heartbeat: a single fill
    leaves it the block it just freed, every time. A disk filled by another process stays full
    like this."""

    def __init__(self, fs: Path) -> None:
        self.path = fs / "filler"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._size = 0
        self._stop = threading.Event()
        self._grow()
        self._thread = threading.Thread(target=self._keep_full, daemon=True)
        self._thread.start()

    def _grow(self) -> None:
        chunk = MIB
        while chunk >= 4096:
            try:
                os.posix_fallocate(self._fd, self._size, chunk)
                self._size += chunk
            except OSError:
                chunk //= 2

    def _keep_full(self) -> None:
        while not self._stop.wait(0.02):
            self._grow()

    def free(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)
        self.path.unlink()


def commands(server, sid: str) -> List[Dict]:
    conn = sqlite3.connect(f"file:{server.data_dir / 'server.db'}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT id, type, status, error_code FROM commands WHERE source_id = ? ORDER BY seq", (sid,))]
    finally:
        conn.close()


def test_full_home_mid_task_then_freed_no_command_lost_or_run_twice(proxied, tiny_home, tmp_path):
    src = random_tree(tmp_path / "src", files=4, size=MIB, seed=9)
    agent, sid = proxied.import_agent("fullhome", home=tiny_home)
    server = proxied.server
    proxied.proxy.throttle(150_000)  # the cycle lasts ~30 s: the home fills in the middle of it
    server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill", "--compression", "0")
    wait_for(lambda: proxied.proxy.bytes_forwarded > MIB // 2, 120, "data flowing")

    filler = Filler(tiny_home.parent)

    def reported_full():
        err = (server.show_source(sid).get("agent") or {}).get("last_error") or {}
        return err if err.get("code") == "agent_home_full" else None

    err = wait_for(reported_full, 120, "the full home reported to the control plane")
    assert str(tiny_home) in err["message"] and "free at least" in err["message"]
    # a command sent while the home is full cannot be recorded, so it is not run (it is
    # delivered again); the witness: still queued after the agent's next poll came and went
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "50")
    def commands_loop_failed():
        loops = (server.show_source(sid).get("agent") or {}).get("loops") or {}
        loop = loops.get("commands") or {}
        return loop if loop.get("failures", 0) >= 1 else None

    loop = wait_for(commands_loop_failed, 120, "the commands loop's failure shown in source show")
    assert "HomeFullError" in loop["last_error"] and str(tiny_home) in loop["last_error"], loop
    text = server.cli("source", "show", sid, json_out=False).stdout
    assert "Agent loops that failed" in text and "commands" in text, text
    modify = [c for c in commands(server, sid) if c["type"] == "modify"]
    assert len(modify) == 1 and modify[0]["status"] == "queued", modify  # not run while full

    filler.free()  # space returns: the agent resumes by itself
    proxied.proxy.throttle(None)
    wait_cycle_done(server, sid, 1, timeout=300)
    wait_for(lambda: all(c["status"] == "succeeded" for c in commands(server, sid)), 180,
             "every command acknowledged succeeded")
    cmds = commands(server, sid)
    assert [c["type"] for c in cmds] == ["start", "modify"]
    log = agent_log(agent)
    assert count(rf"command {modify[0]['id']}: modify", log) == 1, "the modify ran exactly once"
    assert count(rf"command {cmds[0]['id']}: start", log) == 1
    art = server.artifacts(sid)[-1]
    assert diff(build(src), build(Path(art["path"]) / str(src).lstrip("/"))) == []
    # the loop that could not record the command is reported, and the ledger was written later
    # the supervisor restarts the failed loop after its back-off; status.json shows it at the
    # agent's next write (when the cycle ends soon after the home is freed, the first write
    # read here may still show the loop waiting for its restart)
    loops = wait_for(lambda: (lambda ls: ls if ls and all(v["alive"] for v in ls.values()) else None)(
        status(agent).get("loops")), 60, "every loop alive again in status.json")
    assert loops["commands"]["failures"] >= 1 and "agent home" in loops["commands"]["last_error"]
    ledger = json.loads((tiny_home / "state" / "ledger.json").read_text())
    final = {e["id"]: (e["status"], e["ack_sent"]) for e in ledger["entries"]}
    assert final[modify[0]["id"]] == ("succeeded", True) and final[cmds[0]["id"]] == ("succeeded", True)
    assert "Traceback" not in agent.output()
