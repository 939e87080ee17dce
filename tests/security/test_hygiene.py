"""Hygiene of the reference server against an outsider or a hostile source: what it keeps on disk
is for its own user only, a hostile body or a slow client cannot hurt it, and a malformed command
cannot block an agent's command channel. Real server over HTTPS (harness), real agent, real rsync.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

import pytest

from go2cloud_server.client import pinned_session
from tests.integration.harness import Server
from tests.integration.test_server_api import Api, FakeAgent

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
