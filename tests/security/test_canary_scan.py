"""Canary-secret scan of a whole file-level migration (docs/security.md, "Secrets").

The activation code, the admin token and the task's rsync password are canaries: while a real
agent imports and migrates (full sync, then an incremental), every process on the machine is
sampled (``/proc/*/cmdline`` and ``/proc/*/environ``); afterwards the logs and every file of
the agent's home and of the server's data directory are read. The activation code and the admin
token appear nowhere; the rsync password appears in no argv, no log and no agent file, and in
the environment only of the agent's rsync and its tunnel (``RSYNC_PASSWORD``, as designed),
never in the server's rsync daemons.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from tests.support.harness import Server, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="reads every process's environment"),
]


class ProcSampler(threading.Thread):
    """Collects (pid, comm, argv, environ) of every process, every 20 ms, until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.seen: Dict[Tuple[int, bytes], Tuple[bytes, bytes, bytes]] = {}
        self.rounds = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_event.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit() or int(name) == me:
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as fh:
                        argv = fh.read()
                    with open(f"/proc/{name}/environ", "rb") as fh:
                        environ = fh.read()
                    with open(f"/proc/{name}/comm", "rb") as fh:
                        comm = fh.read().strip()
                except OSError:
                    continue
                self.seen[(int(name), argv)] = (comm, argv, environ)
            self.rounds += 1
            time.sleep(0.02)


def _files(root: Path) -> List[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_secret_leaks_during_a_whole_migration(server: Server, agents, tmp_path: Path):
    admin = (server.data_dir / "admin.token").read_text().strip()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i}").write_bytes(os.urandom(64 * 1024))
    sampler = ProcSampler()
    sampler.start()
    try:
        server.j("workgroup", "create", "wg-canary")
        code = server.new_code("wg-canary")
        agent = agents("canary").start(code=code)
        sid = agent.wait_imported()
        server.j("migration", "start", "--workgroup", "wg-canary", "--path", str(src), "--no-drill",
                 "--compression", "0")
        task = server.wait_task(sid, "pending", timeout=120)
        (src / "d" / "new").write_bytes(os.urandom(4 * 1024 * 1024))
        server.j("migration", "sync", "--source", sid)
        wait_for(lambda: server.source_migration(sid)["tasks"][0]["last_committed_cycle"] == 2, 120,
                 "cycle 2 committed")
    finally:
        sampler.stop_event.set()
        sampler.join(10)
    assert sampler.rounds > 20
    password = _task_password(server, task["task_id"])
    token_code = code["token_code"]
    canaries = {"activation code": token_code.encode(), "admin token": admin.encode(),
                "rsync password": password.encode()}

    # processes: the agent's rsync and tunnel were seen, so the sample covers the transfer
    rsync_envs: Set[bytes] = set()
    tunnel_seen = daemon_seen = False
    for comm, argv, environ in sampler.seen.values():
        for what, canary in canaries.items():
            assert canary not in argv, f"{what} in the argv of {comm!r}: {argv[:200]!r}"
        assert token_code.encode() not in environ, f"activation code in the environment of {comm!r}"
        assert admin.encode() not in environ, f"admin token in the environment of {comm!r}"
        if password.encode() in environ:
            rsync_envs.add(comm)
            assert b"@go2cloud::" in argv or b"rsync-tunnel" in argv, \
                f"rsync password in the environment of {comm!r}: {argv[:200]!r}"
        tunnel_seen |= b"rsync-tunnel" in argv
        if argv.split(b"\x00", 1)[0].endswith(b"rsync") and b"--daemon" in argv and b"--config=" in argv:
            daemon_seen = True
            assert password.encode() not in environ
    assert tunnel_seen and daemon_seen and rsync_envs, "the sample missed the transfer"

    # logs and files
    logs = [Path(server.log.name)] + _files(agent.home / "Logs")
    for path in logs:
        data = path.read_bytes()
        for what, canary in canaries.items():
            assert canary not in data, f"{what} in {path}"
    for path in _files(agent.home):
        data = path.read_bytes()
        assert token_code.encode() not in data, f"activation code in {path}"
        assert password.encode() not in data, f"rsync password in {path}"
        assert admin.encode() not in data, f"admin token in {path}"
    images = server.data_dir / "tasks"
    for path in _files(server.data_dir):
        if images in path.parents:
            continue
        data = path.read_bytes()
        assert token_code.encode() not in data, f"activation code in {path}"  # only its scrypt hash
        if password.encode() in data:
            assert path.name.startswith("server.db"), f"rsync password in {path}"
    sessions = server.data_dir / "rsync-sessions"
    assert not sessions.exists() or not os.listdir(sessions), "a session's secrets file was left behind"


def _task_password(server: Server, task_id: str) -> str:
    import sqlite3

    conn = sqlite3.connect(f"file:{server.data_dir / 'server.db'}?mode=ro", uri=True)
    try:
        (value,) = conn.execute("SELECT rsync_password FROM tasks WHERE id = ?", (task_id,)).fetchone()
    finally:
        conn.close()
    return str(value)
