"""The drill on real conditions built here (needs root: loop devices, mounts, namespaces).

* ``go2cloud_client check`` against a loop-mounted ext4 filled to 100%, a noexec tmpfs as the
  temporary directory, a control plane started with a skewed clock, a closed target port;
* end to end with the real server and agent: start -> drilling -> drill_passed -> syncing ->
  pending; a path on the full filesystem -> drill_abnormal with the report in ``drill show`` and
  no start command; space freed + ``migration drill`` -> passes and continues; ``--override``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.support.harness import REPO, Server, _env, wait_for

pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 filesystem (loop device) mounted at tmp_path/full and filled to 100%."""
    assert os.geteuid() == 0, "the drill integration tests need root (loop devices, mount)"
    image = tmp_path / "full.img"
    mnt = tmp_path / "full"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-N", "512", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    try:
        (mnt / "data").mkdir()
        (mnt / "data" / "keep.txt").write_text("the data to migrate\n")
        fill(mnt)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path) -> None:
    """Write until the filesystem refuses (ENOSPC)."""
    with open(mnt / "filler", "ab") as fh:
        try:
            while True:
                fh.write(b"\xa5" * (1 << 20))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            pass
    try:  # the last partial blocks
        with open(mnt / "filler2", "wb") as fh:
            while True:
                fh.write(b"x" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError:
        pass


def free(mnt: Path) -> None:
    for name in ("filler", "filler2"):
        (mnt / name).unlink(missing_ok=True)
    os.sync()


@pytest.fixture
def noexec_tmp(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "noexec-tmp"
    where.mkdir()
    _run("mount", "-t", "tmpfs", "-o", "noexec,size=8m", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def check(*args: str, env: Dict[str, str] = None) -> subprocess.CompletedProcess:  # type: ignore[assignment]
    return subprocess.run([sys.executable, "-m", "go2cloud_client", "check", *args],
                          capture_output=True, text=True, timeout=120, env=_env(env), cwd=str(REPO))


def items(proc: subprocess.CompletedProcess, name: str) -> List[Dict[str, Any]]:
    return [i for i in json.loads(proc.stdout)["items"] if i["check"] == name]


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


# -- the check command on real conditions ---------------------------------------------------------


def test_full_filesystem_is_critical_naming_the_path(full_fs, tmp_path):
    path = str(full_fs / "data")
    proc = check("--json", "--path", path, "--home", str(tmp_path / "home"))
    assert proc.returncode == 35, proc.stderr
    (item,) = [i for i in items(proc, "free_space") if i["data"]["path"] == path]
    assert item["severity"] == "critical" and path in item["finding"] and str(full_fs) in item["finding"]
    assert item["data"]["used_pct"] > 99
    human = check("--path", path, "--home", str(tmp_path / "home"))
    assert human.returncode == 35 and "Critical (" in human.stdout and f"path {path}" in human.stdout
    assert "error: the drill found 1 critical item" in human.stderr
    free(full_fs)
    again = check("--json", "--path", path, "--home", str(tmp_path / "home"))
    assert again.returncode == 0, again.stdout
    assert {i["severity"] for i in items(again, "free_space")} == {"info"}


def test_noexec_tmp_is_a_finding(noexec_tmp, tmp_path):
    proc = check("--json", "--path", str(tmp_path), "--home", str(tmp_path / "home"),
                 env={"TMPDIR": str(noexec_tmp)})
    (item,) = items(proc, "tmp")
    assert item["severity"] == "warning" and "noexec" in item["finding"]
    assert str(noexec_tmp) in item["finding"]
    assert "remount,exec" in item["fix"]
    plain = check("--json", "--path", str(tmp_path), "--home", str(tmp_path / "home"))
    assert items(plain, "tmp")[0]["severity"] == "info"


def test_skewed_server_clock_is_critical(tmp_path):
    skewed = Server(tmp_path / "skewed", extra_args=["--clock-offset-s=-900"]).start()
    try:
        proc = check("--json", "--path", str(tmp_path), "--home", str(tmp_path / "home"),
                     "--server", skewed.url, "--server-fingerprint", skewed.fingerprint)
    finally:
        skewed.stop()
    assert proc.returncode == 35
    (clock,) = items(proc, "clock")
    assert clock["severity"] == "critical" and "ahead of the control plane" in clock["finding"]
    assert 880 < clock["data"]["skew_s"] < 920 and "NTP" in clock["fix"]
    assert items(proc, "control_plane")[0]["severity"] == "info"


def test_server_in_time_unreachable_server_and_closed_target_port(server, tmp_path):
    port = closed_port()
    proc = check("--json", "--path", str(tmp_path), "--home", str(tmp_path / "home"), "--server", server.url,
                 "--server-fingerprint", server.fingerprint, "--target", f"127.0.0.1:{port}",
                 "--target", f"127.0.0.1:{server.port}")
    assert proc.returncode == 35
    assert items(proc, "clock")[0]["severity"] == "info"
    closed, opened = items(proc, "target_ports")
    assert closed["severity"] == "critical" and f"127.0.0.1:{port}" in closed["finding"]
    assert opened["severity"] == "info"
    gone = check("--json", "--path", str(tmp_path), "--home", str(tmp_path / "home"),
                 "--server", f"https://127.0.0.1:{port}", "--server-fingerprint", server.fingerprint)
    assert gone.returncode == 35 and items(gone, "control_plane")[0]["severity"] == "critical"


# -- end to end ---------------------------------------------------------------------------------


def _commands_of(server: Server, task_id: str) -> List[str]:
    conn = sqlite3.connect(f"file:{server.data_dir / 'server.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT type FROM commands WHERE task_id = ? ORDER BY seq", (task_id,))
        return [r[0] for r in rows]
    finally:
        conn.close()


def _history(task: Dict[str, Any]) -> List[str]:
    return [h["status"] for h in task["history"]]


def test_drill_end_to_end(server, agents, tmp_path, full_fs):
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    (ok_dir / "a.txt").write_text("hello\n")
    server.j("workgroup", "create", "wg-drill")
    agent = agents("drill")
    agent.start(code=server.new_code("wg-drill", uses=1))
    sid = agent.wait_imported()

    # 1. the drill passes: drilling -> drill_passed -> syncing -> pending
    server.j("migration", "start", "--source", sid, "--path", str(ok_dir))
    task = server.wait_task(sid, "pending", timeout=120)
    assert _history(task) == ["drilling", "drill_passed", "syncing", "pending"]
    assert _commands_of(server, task["task_id"]) == ["drill", "start"]
    shown = server.drill(sid)
    assert shown["status"] == "passed" and shown["report"]["ran"] is True
    assert {i["check"] for i in shown["report"]["items"]} >= {"free_space", "clock", "target_ports", "fstab"}
    ports = [i for i in shown["report"]["items"] if i["check"] == "target_ports"]
    assert ports[0]["severity"] == "info" and ports[0]["data"]["port"] == server.port
    wait_for(lambda: any(line.startswith("Drill passed") for line in agent.lines), 10, "the drill line")
    server.j("migration", "cancel", "--source", sid)

    # 2. a path on the full filesystem: drill_abnormal, the report, no start command
    path = str(full_fs / "data")
    tid = server.j("migration", "start", "--source", sid, "--path", path)["started"][0]["task_id"]
    task = server.wait_task(sid, "drill_abnormal", timeout=60)
    assert server.source(sid)["status"] == "drill_abnormal"
    assert server.j("migration", "show", "--workgroup", "wg-drill")["status"] == "in_progress"
    human = server.cli("drill", "show", "--source", sid, json_out=False).stdout
    assert "abnormal" in human and "Critical (1):" in human and f"path {path}" in human and "fix:" in human
    assert _commands_of(server, tid) == ["drill"]
    first = server.drill(sid)["drill_id"]
    # re-run without fixing: abnormal again
    server.j("migration", "drill", "--source", sid)
    wait_for(lambda: server.drill(sid)["drill_id"] != first and server.drill(sid)["status"] != "running", 60,
             "the second drill report")
    assert server.task_status(sid) == "drill_abnormal"

    # 3. free space, run the drill again: it passes and the migration continues
    free(full_fs)
    server.j("migration", "drill", "--source", sid)
    task = server.wait_task(sid, "pending", timeout=120)
    assert _history(task) == ["drilling", "drill_abnormal", "drilling", "drill_abnormal", "drilling",
                              "drill_passed", "syncing", "pending"]
    assert _commands_of(server, tid) == ["drill", "drill", "drill", "start"]
    assert task["drill_override"] is None
    server.j("migration", "cancel", "--source", sid)

    # 4. full again: --override starts it anyway and records who and when
    fill(full_fs)
    server.j("migration", "start", "--source", sid, "--path", path)
    server.wait_task(sid, "drill_abnormal", timeout=60)
    server.j("migration", "drill", "--source", sid, "--override")
    task = server.wait_task(sid, "pending", timeout=120)
    assert _history(task) == ["drilling", "drill_abnormal", "drill_passed", "syncing", "pending"]
    assert task["drill_override"]["by"] and task["drill_override"]["at"]
    human = server.cli("drill", "show", "--source", sid, json_out=False).stdout
    assert "started despite critical items by" in human
    image = Path(server.artifacts(sid)[-1]["path"]) / path.lstrip("/") / "keep.txt"
    assert image.read_text() == "the data to migrate\n"
