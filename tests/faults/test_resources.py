"""Bounded resources of the control plane (issue 17, item 3; docs/reliability.md section 3).

The real server over HTTPS on loopback, except for the tables of the service that the HTTP API
cannot show (the fence's memory of refused agent processes, the per-task locks): those are
checked on a real Service and SQLite store, with the unit tests' stand-ins for the rsync daemon
and the task trees (not involved in fencing nor acknowledgements).

Before the fix every thread that served a connection opened its own SQLite connection (2 fds:
the database and its WAL) and kept it forever: under a soft limit of 1024 open files the server
answered 500 to everything after ~500 connections.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

from go2cloud_server.errors import SessionBusy
from go2cloud_server.service import Service
from go2cloud_server.service import sessions as sessions_mod
from go2cloud_server.store import Store
from tests.support.harness import Server
from tests.unit.server.conftest import Clock, FakeRsyncd, FakeTrees, import_body
from tests.unit.server.test_block_tasks import FakeBlockStores

pytestmark = pytest.mark.integration


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def _nofile(pid: int) -> Tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def _admin_get(server: Server, path: str, ctx: ssl.SSLContext) -> Tuple[int, Dict]:
    """One request on a new TLS connection (closed after the answer), as a fresh client does."""
    token = (server.data_dir / "admin.token").read_text().strip()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                        "Connection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback; the pin is not what this test is about
    return ctx


def _settle(pid: int, limit: int = 4, timeout: float = 30.0) -> Tuple[int, int]:
    """fds and threads once the connection threads of the requests before have ended."""
    deadline = time.monotonic() + timeout
    fds, threads = _fds(pid), _threads(pid)
    while time.monotonic() < deadline and threads > limit + 12:
        time.sleep(0.1)
        fds, threads = _fds(pid), _threads(pid)
    return fds, threads


def test_many_connections_under_a_low_fd_limit_all_succeed_and_leak_nothing(server: Server) -> None:
    requests = 2000
    pid = server.proc.pid
    # the common low soft limit, here also the hard one (the server cannot raise it): 256
    subprocess.run(["prlimit", f"--pid={pid}", "--nofile=256:256"], check=True)
    assert _nofile(pid) == (256, 256)
    ctx = _client_ctx()
    server.j("workgroup", "create", "wg-fd")
    assert _admin_get(server, "/api/v1/workgroups", ctx)[0] == 200
    fds0, threads0 = _settle(pid)
    failed = []
    for i in range(requests):
        status, body = _admin_get(server, "/api/v1/workgroups", ctx)
        if status != 200:
            failed.append((i, status, body))
            if len(failed) > 5:
                break
    assert not failed, f"requests failed (first ones): {failed[:3]}; fds {_fds(pid)}"
    fds1, threads1 = _settle(pid)
    assert fds1 <= fds0 + 4, f"fds {fds0} before, {fds1} after {requests} connections"
    assert threads1 <= threads0 + 4, f"threads {threads0} before, {threads1} after"


def test_soft_fd_limit_raised_to_the_hard_limit_at_start(tmp_path: Path) -> None:
    """Started with a soft limit of 512 (as a unit file or a login shell might), the server runs
    with its hard limit and says so in its log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"this machine's hard limit is {hard}")
    srv = Server(tmp_path / "data")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # inherited by the server
    try:
        srv.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        server_soft, server_hard = _nofile(srv.proc.pid)
        assert server_soft == server_hard > 512
        log = Path(srv.log.name).read_text()
        assert f"open files: soft limit raised from 512 to {server_hard}" in log, log[-2000:]
    finally:
        srv.stop()


def _service(tmp_path: Path) -> Service:
    store = Store(tmp_path / "server.db")
    store.migrate()
    return Service(store, tmp_path, rsyncd=FakeRsyncd([]), tree_factory=FakeTrees([]),
                   block_store_factory=FakeBlockStores(), public_host="10.0.0.1",
                   public_url="https://10.0.0.1:8443", fingerprint="sha256:" + "ab" * 32,
                   heartbeat_interval=10, clock=Clock())


FP_A = {"machine_id": "aaaa", "disk_serials": ["sa"], "macs": ["02:00:00:00:00:0a"]}
FP_B = {"machine_id": "bbbb", "disk_serials": ["sb"], "macs": ["02:00:00:00:00:0b"]}


def test_refused_agent_processes_are_not_remembered_forever(tmp_path: Path, monkeypatch) -> None:
    """A clone in a restart loop opens a session with a new process id each time; the fence
    remembered every refused one (the set of reported clones was never pruned). With the bound at
    50 for the test, 300 refused processes leave at most 51 of each table, and every one of them
    was still refused."""
    monkeypatch.setattr(sessions_mod, "FENCE_MEMORY", 50)
    service = _service(tmp_path)
    try:
        service.create_workgroup({"name": "wg"})
        sid = service.import_source(import_body(service.create_code("wg", {"uses": 1})))["source_id"]
        service.open_session(sid, {"session_id": "home-1", "instance": "p-holder", "fingerprint": FP_A})
        refused = 0
        for i in range(300):
            try:
                service.open_session(sid, {"session_id": "home-1", "instance": f"clone-{i}",
                                           "fingerprint": FP_B})
            except SessionBusy:
                refused += 1
        assert refused == 300
        assert service.show_source(sid)["clone_warning"]["code"] == "session_conflict"
        assert len(service.sessions._flagged) <= 51, len(service.sessions._flagged)
        assert len(service.sessions._contenders) <= 51, len(service.sessions._contenders)
    finally:
        service.close()
        service.store.close()


def test_per_task_acknowledgement_locks_do_not_accumulate(tmp_path: Path) -> None:
    """Every task whose command was acknowledged left a lock in the service for good; now a lock
    lives only while an acknowledgement is applied."""
    service = _service(tmp_path)
    try:
        service.create_workgroup({"name": "wg"})
        code = service.create_code("wg", {"uses": 20})
        tasks = set()
        for i in range(20):
            sid = service.import_source(import_body(code, inventory={"hostname": f"h{i}",
                                                                     "machine_id": f"m-{i}"}))["source_id"]
            service.start_migration({"drill": False, "mode": "block", "disks": ["/dev/vdb"]}, source=sid)
            start = service.poll_commands(sid, 0)["commands"][0]
            tid = start["params"]["task_id"]
            tasks.add(tid)
            service.ack_command(sid, start["id"], {"status": "succeeded", "result": {}})
            assert service.task_artifacts(tid)["artifacts"], "the acknowledgement was not applied"
        assert len(tasks) == 20
        gc.collect()
        assert len(service.commands._apply_locks) == 0, dict(service.commands._apply_locks)
    finally:
        service.close()
        service.store.close()


def _environ(pid: int) -> Dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_the_server_runs_without_glibcs_per_thread_caches(tmp_path: Path) -> None:
    """With a thread per connection, glibc's per-thread caches (tcache) grew the RSS under 1,000
    agents by ~1.5 MiB a minute (docs/performance.md); the server re-executes itself once with
    them off and 2 arenas, logs it, and keeps an operator's own GLIBC_TUNABLES untouched."""
    srv = Server(tmp_path / "data", extra_args=["--log-level", "info"]).start()
    try:
        pid = srv.proc.pid
        assert int(srv.info["pid"]) == pid  # the same process, re-executed
        assert _environ(pid).get("GO2CLOUD_MALLOC_TUNED") == "1"
        log = Path(srv.log.name).read_text()
        assert ("memory allocator: GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2"
                in log), log[-2000:]
        # the server answers as before (an authenticated database read over HTTPS)
        assert _admin_get(srv, "/api/v1/workgroups", _client_ctx())[0] == 200
    finally:
        srv.stop()
    own = Server(tmp_path / "own", extra_env={"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}).start()
    try:
        env = _environ(own.proc.pid)
        assert env.get("GLIBC_TUNABLES") == "glibc.malloc.arena_max=4"
        assert "GO2CLOUD_MALLOC_TUNED" not in env
    finally:
        own.stop()
