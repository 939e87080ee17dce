"""The agent's lifecycle against the real reference server, in real processes on loopback."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socketserver
import threading
import time
from pathlib import Path
from typing import Iterator, Tuple

import psutil
import pytest

from go2cloud_server.manifest import build as tree_manifest
from go2cloud_server.manifest import diff
from tests.support.harness import Server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.shared_server]  # one server for the module

TRACEBACK = "Traceback (most recent call last)"


def _sample(root: Path, files: int = 50, size: int = 64 * 1024) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "link").symlink_to("../f0000.bin")
    return root


def _imported(server: Server, agents, name: str = "a", uses: int = 5) -> Tuple[object, str]:
    try:
        server.j("workgroup", "create", "wg-life")
    except AssertionError:
        pass
    code = server.new_code("wg-life", uses=uses)
    agent = agents(name).start(code=code)
    return agent, agent.wait_imported()


def _rsync_children(home: Path) -> list:
    """rsync processes started by the agent of this home (their command lines name the task's
    module through the tunnel, and the filter file in this home)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if (p.info["name"] == "rsync" and any("@go2cloud::" in a for a in cmd)
                and any(str(home) in a for a in cmd)):
            found.append(p)
    return found


def test_import_prints_success_line_and_goes_online(server, agents):
    agent, sid = _imported(server, agents)
    assert sid.startswith("s-") and len(sid) > 5
    wait_for(lambda: server.source(sid)["status"] == "online", 15, "source online")
    status = agent.run_cli("status", "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["source_id"] == sid
    assert st["running"] is True
    # the activation code is not stored anywhere in the home
    code_files = [p for p in agent.home.rglob("*") if p.is_file()]
    assert code_files, "the home should hold the identity and state"
    for p in agent.home.rglob("*"):
        if p.is_file() and "Logs" not in p.parts:
            assert oct(p.stat().st_mode & 0o777) == oct(0o600), p
    assert (agent.home.stat().st_mode & 0o777) == 0o700


def test_code_uses_are_exact_under_concurrent_agent_imports(server, agents):
    server.j("workgroup", "create", "wg-race")
    code = server.new_code("wg-race", uses=3)
    procs = [agents(f"r{i}").start(code=code) for i in range(6)]
    results = []
    for a in procs:
        def done(a=a):
            if a.proc.poll() is not None:
                return "exited"
            return "imported" if any(line.endswith("] Successfully!") for line in a.lines) else None
        results.append(wait_for(done, 60, "import outcome"))
    assert results.count("imported") == 3, results
    exhausted = [a for a, r in zip(procs, results) if r == "exited"]
    for a in exhausted:
        assert a.proc.returncode == 22, a.output()
        assert "no uses left" in a.output().lower() or "exhausted" in a.output().lower()
        assert TRACEBACK not in a.output()


def test_offline_after_missed_heartbeats_then_online_again(server, agents):
    agent, sid = _imported(server, agents)
    wait_for(lambda: server.source(sid)["status"] == "online", 15, "online")
    agent.kill(signal.SIGKILL)
    wait_for(lambda: server.source(sid)["status"] == "offline", 15, "offline after 3 missed heartbeats")
    agent.start()  # same home: resumes as the same source, no code needed
    wait_for(lambda: any(sid in line for line in agent.lines), 30, "agent resumed as the same source")
    wait_for(lambda: server.source(sid)["status"] == "online", 15, "online again")


def test_abort_then_reimport_creates_a_new_source(server, agents, tmp_path):
    agent, sid = _imported(server, agents, uses=2)
    src = _sample(tmp_path / "src-abort", files=20)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "1")
    wait_for(lambda: _rsync_children(agent.home), 30, "rsync running")
    out = agent.run_cli("--abort")
    assert out.returncode == 0, out.stderr
    assert TRACEBACK not in out.stdout + out.stderr
    agent.proc.wait(timeout=40)
    wait_for(lambda: not _rsync_children(agent.home), 20, "rsync stopped by --abort")
    status = json.loads(agent.run_cli("status", "--json").stdout)
    assert not status.get("source_id")
    code = server.new_code("wg-life", uses=1)
    agent.start(code=code)
    new_sid = agent.wait_imported()
    assert new_sid != sid
    wait_for(lambda: server.source(sid)["status"] == "replaced", 15, "old source replaced")


def test_agent_killed_mid_cycle_resumes_and_runs_the_cycle_once(server, agents, tmp_path):
    agent, sid = _imported(server, agents)
    src = _sample(tmp_path / "src-kill", files=40, size=256 * 1024)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "20")
    wait_for(lambda: _rsync_children(agent.home), 30, "rsync running")
    time.sleep(1.0)
    agent.kill(signal.SIGKILL)
    # the orphaned rsync is gone or finishing; a restarted agent resumes the same cycle
    agent.start()
    wait_for(lambda: any("Successfully" in line or sid in line for line in agent.lines), 30, "agent back")
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    server.wait_task(sid, "pending", timeout=120)
    assert [a["cycle"] for a in server.artifacts(sid)] == [1]
    assert diff(tree_manifest(src), tree_manifest(server.artifact_tree(sid, src))) == []
    # the next cycle is 2, not a second run of the first start command
    server.j("migration", "sync", "--source", sid)
    server.wait_task(sid, "pending", timeout=120)
    wait_for(lambda: [a["cycle"] for a in server.artifacts(sid)] == [1, 2], 20, "artifacts 1 and 2")


def test_pause_stops_rsync_and_resume_finishes(server, agents, tmp_path):
    agent, sid = _imported(server, agents)
    src = _sample(tmp_path / "src-pause", files=40, size=256 * 1024)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "4")
    wait_for(lambda: _rsync_children(agent.home), 30, "rsync running")
    server.j("migration", "pause", "--source", sid)
    server.wait_task(sid, "paused", timeout=30)
    wait_for(lambda: not _rsync_children(agent.home), 20, "rsync stopped by pause")
    # the agent acknowledged the pause after its transfer ended; a heartbeat sent since then that
    # reports the task paused shows it went on running its loops without resuming the transfer
    seen = server.show_source(sid)["last_seen_at"]

    def paused_heartbeat() -> bool:
        src = server.show_source(sid)
        return src["last_seen_at"] > seen and src["agent"]["state"] == "paused"

    wait_for(paused_heartbeat, 30, "a heartbeat after the pause reporting the task paused")
    assert not _rsync_children(agent.home), "paused task must not transfer"
    # nor did it start a transfer meanwhile (the agent logs the pause once its transfer ended)
    task_id = server.source_migration(sid)["tasks"][0]["task_id"]
    log = (agent.home / "Logs" / "go2cloud_client.log").read_text()
    since_pause = log.split(f"Task {task_id} paused")[-1]
    assert "go2cloud_client.replication" not in since_pause, since_pause
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    server.j("migration", "resume", "--source", sid)
    server.wait_task(sid, "pending", timeout=120)
    assert diff(tree_manifest(src), tree_manifest(server.artifact_tree(sid, src))) == []


def test_modify_takes_effect_on_the_running_cycle(server, agents, tmp_path):
    agent, sid = _imported(server, agents)
    # 24 MiB at 1 Mbit/s would take over 3 minutes; lifting the limit must finish it well before
    src = _sample(tmp_path / "src-modify", files=12, size=2 * 1024 * 1024)
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "1",
             "--compression", "0")
    wait_for(lambda: _rsync_children(agent.home), 30, "rsync running")
    time.sleep(1)
    assert any("--bwlimit=122" in " ".join(p.cmdline()) for p in _rsync_children(agent.home))
    server.j("migration", "modify", "--source", sid, "--bandwidth-mbps", "0")
    wait_for(lambda: not any("--bwlimit" in " ".join(p.cmdline()) for p in _rsync_children(agent.home)),
             30, "rsync restarted without a limit")
    server.wait_task(sid, "pending", timeout=90)


# --- bad input: each a clear message and a documented exit code, never a traceback ---------------


def test_wrong_code_unknown_and_revoked(server, agents):
    server.j("workgroup", "create", "wg-bad")
    code = server.new_code("wg-bad", uses=5)
    wrong = dict(code, token_code="x" * len(code["token_code"]))
    a = agents("wrong").start(code=wrong)
    assert a.proc.wait(timeout=30) == 20, a.output()
    assert TRACEBACK not in a.output()
    server.j("code", "revoke", code["token_id"])
    b = agents("revoked").start(code=code)
    assert b.proc.wait(timeout=30) == 23, b.output()
    assert "revoked" in b.output().lower()
    assert code["token_code"] not in a.output() + b.output()


def test_unreachable_server_and_wrong_fingerprint(server, agents):
    server.j("workgroup", "create", "wg-net")
    code = server.new_code("wg-net")
    a = agents("unreach")
    r = a.run_cli("--no-prompt", "--server", "https://127.0.0.1:9", "--token-id", code["token_id"],
                  token_code=code["token_code"], timeout=120)
    assert r.returncode == 10, r.stdout + r.stderr
    assert "127.0.0.1:9" in r.stderr and TRACEBACK not in r.stderr
    r = a.run_cli("--no-prompt", "--server", server.url, "--server-fingerprint", "sha256:" + "00" * 32,
                  "--token-id", code["token_id"], token_code=code["token_code"], timeout=120)
    assert r.returncode == 11, r.stdout + r.stderr
    assert "fingerprint" in r.stderr.lower() and TRACEBACK not in r.stderr
    assert code["token_code"] not in r.stdout + r.stderr


class _Junk(http.server.BaseHTTPRequestHandler):
    body = b"this is not json"

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def junk_server() -> Iterator[Tuple[str, type]]:
    handler = type("Handler", (_Junk,), {})
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("body", [b"this is not json", b'{"source_id": 42}', b"[" * 10 + b"]" * 10,
                                  b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'],
                         ids=["not-json", "wrong-type", "nested-list", "oversized"])
def test_malformed_or_oversized_server_response(tmp_path, junk_server, body):
    url, handler = junk_server
    handler.body = body
    from tests.support.harness import Agent

    a = Agent(tmp_path / "home-junk", server=None)  # type: ignore[arg-type]
    r = a.run_cli("--no-prompt", "--server", url, "--token-id", "at-x", token_code="y" * 20, timeout=120)
    assert r.returncode == 12, r.stdout + r.stderr
    assert TRACEBACK not in r.stderr
    assert r.stderr.startswith("error: ")
