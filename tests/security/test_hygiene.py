"""Hygiene of the reference server against an outsider or a hostile source: what it keeps on disk
is for its own user only, a hostile body or a slow client cannot hurt it, and a malformed command
cannot block an agent's command channel. Real server over HTTPS (harness), real agent, real rsync.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import ssl
import stat
import time
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import pytest

from go2cloud_server.manifest import build, diff
from go2cloud_server.tlspin import pinned_session
from tests.support import tree
from tests.support.fakeagent import Api, FakeAgent
from tests.support.harness import Server, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.shared_server]  # one server for the module

#: the deadline the server of these tests is started with (the default is 30 s)
DEADLINE_S = 3.0


@pytest.fixture
def quick_server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "server-data", extra_args=["--request-timeout", str(DEADLINE_S)]).start()
    yield srv
    srv.stop()


def _tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a hostile client does not care who the server is
    return ctx


def _connect(server: Server) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed ``sock`` (end of file or reset) within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, ssl.SSLWantReadError):
        return False
    except OSError:  # reset, or the TLS layer's end of file
        return True


def _trickle(sock: socket.socket, data: bytes, limit: float) -> Optional[float]:
    """Send ``data`` one byte a second; the seconds after which the server closed the
    connection, or None if it was still open after ``limit`` seconds."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - started
        if _closed(sock, 1.0):
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            return None
    raise AssertionError("ran out of bytes to trickle")


# -- b. a body nested 100,000 deep ----------------------------------------------------------------
def test_deeply_nested_json_body_is_a_400_not_a_500(server: Server):
    session = pinned_session(server.fingerprint)
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100 + b"1" + b"}" * 100):
        resp = session.post(server.url + "/api/v1/sources/import", data=body, verify=False, timeout=30,
                            headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "invalid_request"
        assert "nested more than 64 levels" in resp.json()["error"]["message"]
    # the server is fine afterwards
    assert session.get(server.url + "/api/v1/time", verify=False, timeout=10).status_code == 200


def test_agent_reads_a_deeply_nested_answer_as_a_protocol_error(tmp_path: Path):
    import responses

    from go2cloud_client.api import ControlPlane
    from go2cloud_client.errors import ProtocolError, ServerError

    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, "http://127.0.0.1:9/api/v1/time", body=b"[" * 100_000 + b"]" * 100_000)
        rsps.add(responses.GET, "http://127.0.0.1:9/api/v1/time", status=500,
                 body=b'{"error":' * 100_000 + b"1" + b"}" * 100_000)
        cp = ControlPlane("http://127.0.0.1:9")
        with pytest.raises(ProtocolError, match="nested too deeply"):
            cp.server_time()
        with pytest.raises(ServerError, match="HTTP 500"):
            cp.server_time()


# -- c. slow clients --------------------------------------------------------------------------------
def test_trickled_headers_are_cut_at_the_deadline(quick_server: Server):
    sock = _tls_client().wrap_socket(_connect(quick_server))
    sock.sendall(b"GET /api/v1/time HTTP/1.1\r\n")
    cut = _trickle(sock, b"X-Slow: " + b"a" * 100, limit=DEADLINE_S + 10)
    assert cut is not None, "a client trickling its headers kept its connection"
    assert cut < DEADLINE_S + 2.5, cut


def test_trickled_tls_handshake_is_cut_at_the_deadline(quick_server: Server):
    # a real ClientHello, sent one byte a second
    hello = ssl.MemoryBIO()
    tls = _tls_client().wrap_bio(ssl.MemoryBIO(), hello)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = _connect(quick_server)
    cut = _trickle(sock, hello.read(), limit=DEADLINE_S + 10)
    assert cut is not None and cut < DEADLINE_S + 2.5, cut


def test_trickled_body_is_cut(quick_server: Server):
    sock = _tls_client().wrap_socket(_connect(quick_server))
    sock.sendall(b"POST /api/v1/sources/import HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200\r\n\r\n")
    cut = _trickle(sock, b'{"token_id": "' + b"a" * 190, limit=DEADLINE_S + 15)
    # request timeout + 200 bytes at 16 KiB/s
    assert cut is not None and cut < DEADLINE_S + 2.5, cut


def test_long_poll_outlives_the_deadline(quick_server: Server):
    quick_server.j("workgroup", "create", "web")
    agent = FakeAgent(Api(quick_server))
    assert agent.import_(quick_server.new_code("web")).status_code == 201
    agent.login()
    started = time.monotonic()
    resp = agent.get("/commands", params={"wait": 2 * DEADLINE_S})
    assert resp.status_code == 200 and resp.json() == {"commands": []}
    assert time.monotonic() - started >= 2 * DEADLINE_S - 0.5
    # the same keep-alive connection, idle for longer than the deadline, still serves a request:
    # only a request that has started has the deadline
    time.sleep(DEADLINE_S + 1)
    assert agent.get("/commands", params={"wait": 0}).status_code == 200


# -- a. modes of the data directory ----------------------------------------------------------------
def _excluded_defaults(rel: bytes, is_dir: bool) -> bool:
    """The shipped default exclusions the nasty tree exercises."""
    return rel == b"swapfile" or rel.startswith(b"tmp/") or rel.startswith(b"var/tmp/")


def _image_dirs(data_dir: Path) -> set:
    """The cycle images of file tasks (tasks/<id>/tree/NNNNNN/): copies of the sources, whose own
    modes rsync keeps (checked against the source by manifest, not by this rule)."""
    return {p for p in data_dir.glob("tasks/*/tree/*") if p.is_dir() and re.fullmatch(r"\d{6}", p.name)}


def _loose_modes(data_dir: Path) -> list:
    images = _image_dirs(data_dir)
    loose = []
    for dirpath, dirnames, filenames in os.walk(data_dir):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in images]
        for name, want in [(d, 0o700) for d in dirnames] + [(f, 0o600) for f in filenames]:
            path = here / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) != want:
                loose.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(data_dir)}")
    return loose


def test_data_dir_is_for_the_server_user_only_after_a_real_migration(server: Server, agents, tmp_path: Path):
    src = tree.build(tmp_path / "source")
    server.j("workgroup", "create", "wg-modes")
    agent = agents("modes")
    agent.start(code=server.new_code("wg-modes", uses=1))
    sid = agent.wait_imported()
    server.j("migration", "start", "--source", sid, "--path", str(src), "--no-drill")
    server.wait_task(sid, "pending", timeout=120)
    tree.change_content(src)
    server.j("migration", "sync", "--source", sid)
    wait_for(lambda: len(server.artifacts(sid)) == 2, 120, "the second image")
    server.wait_task(sid, "pending", timeout=60)

    # rsync (as root, chrooted into the module) still wrote the image, source modes and all
    image = Path(server.artifacts(sid)[-1]["path"]) / str(src).lstrip("/")
    assert diff(build(src, exclude=_excluded_defaults), build(image)) == []
    assert (server.data_dir / "server.db-wal").exists()
    loose = _loose_modes(server.data_dir)
    assert not loose, "readable by others:\n" + "\n".join(loose)
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700


# -- d. a malformed command does not block the command channel -------------------------------------
def _queue_raw_command(server: Server, source_id: str, cid: str, ctype: object, params: str) -> None:
    """A command row as the control plane (or anything that can write its database) could queue it,
    bypassing every check of the service layer."""
    with sqlite3.connect(str(server.data_dir / "server.db"), timeout=30) as db:
        db.execute("INSERT INTO commands (id, source_id, task_id, type, params, status, created_at, "
                   "updated_at) VALUES (?, ?, NULL, ?, ?, 'queued', '2026-01-01T00:00:00Z', "
                   "'2026-01-01T00:00:00Z')", (cid, source_id, ctype, params))


def _command_status(server: Server, cid: str) -> Optional[str]:
    with sqlite3.connect(str(server.data_dir / "server.db"), timeout=30) as db:
        row = db.execute("SELECT status, error_code FROM commands WHERE id = ?", (cid,)).fetchone()
    return f"{row[0]}:{row[1]}" if row else None


def test_malformed_commands_do_not_block_the_ones_after_them(server: Server, agents):
    server.j("workgroup", "create", "wg-cmds")
    agent = agents("cmds")
    agent.home.mkdir(mode=0o700)
    (agent.home / "config.yaml").write_text("poll_wait_s: 1\n")  # the crafted rows are not notified
    agent.start(code=server.new_code("wg-cmds", uses=1))
    sid = agent.wait_imported()
    unusable = ["c-bad/../x", "c-" + "x" * 200, "c-sp ace"]
    for cid in unusable:
        _queue_raw_command(server, sid, cid, "pause", "{}")
    _queue_raw_command(server, sid, "c-start-bad", "start", '{"task_id": "t/../x", "mode": "file"}')
    _queue_raw_command(server, sid, "c-params-list", "pause", "[1, 2]")
    _queue_raw_command(server, sid, "c-later", "frobnicate", "{}")

    # the commands after the malformed ones are answered: rejected with an error code, unsupported
    wait_for(lambda: _command_status(server, "c-later") == "unsupported:unsupported", 60,
             "the command after the malformed ones to be acknowledged")
    assert _command_status(server, "c-start-bad") == "rejected:command_rejected"
    assert _command_status(server, "c-params-list") == "rejected:command_rejected"
    # those without a usable id cannot be acknowledged: skipped, and logged once each, however
    # often they come again: wait for three more polls (the agent polls again only once it has
    # handled the previous answer, so at least two of them were handled), counted in the server's log
    polls = f"GET /api/v1/sources/{sid}/commands -> 200"

    def answered() -> int:
        return Path(server.log.name).read_text(errors="replace").count(polls)

    before = answered()
    wait_for(lambda: answered() >= before + 3, 60, "three more command polls of the agent")
    log = (agent.home / "Logs" / "go2cloud_client.log").read_text()
    for cid in unusable:
        assert _command_status(server, cid) == "queued:None"
        assert log.count(f"without a usable id ({repr(cid)[:200]})") == 1, log[-3000:]
    # and the channel keeps working for real commands
    server.j("migration", "start", "--source", sid, "--path", "/nonexistent-path", "--no-drill")
    wait_for(lambda: server.task_status(sid) in ("failed", "syncing", "pending"), 60, "the start command")
