"""The agent's rsync transport (``rsync -e "<agent> rsync-tunnel"``): the target URL's checks, the
remote-shell command, the per-run environment, and the upgrade handshake against a loopback fake
of the control plane (plain http is allowed only to a loopback address)."""

from __future__ import annotations

import os
import shlex
import socket
import struct
import sys
import threading
from typing import Dict, List

import pytest

from go2cloud_client.replication import tunnel
from go2cloud_client.replication.tunnel import TunnelError, check_url

FP = "sha256:" + "ab" * 32


@pytest.mark.parametrize("url,expected", [
    ("https://cp.example:8443/rsync/v1/tasks/t-1", ("https", "cp.example", 8443, "/rsync/v1/tasks/t-1")),
    ("https://cp.example/rsync/v1/tasks/t-1", ("https", "cp.example", 443, "/rsync/v1/tasks/t-1")),
    ("https://cp.example:8443/rsync/v1/tasks/t-1/", ("https", "cp.example", 8443, "/rsync/v1/tasks/t-1")),
    ("https://[2001:db8::1]:8443/rsync/v1/tasks/t-1", ("https", "2001:db8::1", 8443, "/rsync/v1/tasks/t-1")),
    ("http://127.0.0.1:8080/rsync/v1/tasks/t-1", ("http", "127.0.0.1", 8080, "/rsync/v1/tasks/t-1")),
    ("http://localhost/rsync/v1/tasks/t-1", ("http", "localhost", 80, "/rsync/v1/tasks/t-1")),
    ("http://[::1]:8080/rsync/v1/tasks/t-1", ("http", "::1", 8080, "/rsync/v1/tasks/t-1")),
])
def test_check_url_accepts_https_and_loopback_http(url, expected):
    assert check_url(url) == expected


@pytest.mark.parametrize("url", [
    "http://10.0.0.1:8080/rsync/v1/tasks/t-1",
    "http://cp.example/rsync/v1/tasks/t-1",
])
def test_check_url_refuses_plain_http_off_loopback(url):
    with pytest.raises(TunnelError, match="loopback"):
        check_url(url)


@pytest.mark.parametrize("url", [
    "ftp://cp.example/rsync/v1/tasks/t-1",
    "rsync://cp.example:8873/t-1",
    "https:///rsync/v1/tasks/t-1",
    "https://cp.example/rsync/v1/tasks/t-1?x=1",
    "https://cp.example/rsync/v1/tasks/t-1#frag",
    "cp.example/rsync/v1/tasks/t-1",
    "",
])
def test_check_url_refuses_other_schemes_and_shapes(url):
    with pytest.raises(TunnelError, match="invalid rsync target URL"):
        check_url(url)


@pytest.mark.parametrize("path", [
    "", "/", "/rsync/v1/tasks", "/rsync/v1/tasks/", "/rsync/v1/tasks/t-1/session", "/rsync/v2/tasks/t-1",
    "/block/v1/tasks/t-1", "/x/rsync/v1/tasks/t-1",
])
def test_check_url_wants_the_task_path(path):
    with pytest.raises(TunnelError, match="path"):
        check_url(f"https://cp.example:8443{path}")


def test_command_runs_this_python_as_a_module(monkeypatch):
    monkeypatch.delattr(sys, "frozen", raising=False)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    assert tunnel.command() == "/usr/bin/python3 -m go2cloud_client rsync-tunnel"
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    cmd = tunnel.command()
    assert cmd == "'/opt/my python/bin/python3' -m go2cloud_client rsync-tunnel"
    assert shlex.split(cmd) == ["/opt/my python/bin/python3", "-m", "go2cloud_client", "rsync-tunnel"]


def test_command_of_a_frozen_agent_or_a_given_executable(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/go2cloud/go2cloud_client")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert tunnel.command() == "/opt/go2cloud/go2cloud_client rsync-tunnel"
    monkeypatch.delattr(sys, "frozen")
    assert tunnel.command("/usr/local/bin/go2 cloud") == "'/usr/local/bin/go2 cloud' rsync-tunnel"


def test_tunnel_env_has_no_password():
    env = tunnel.tunnel_env("https://cp/rsync/v1/tasks/t-1", FP, 7, "/srv/a b", 3)
    assert env == {tunnel.ENV_URL: "https://cp/rsync/v1/tasks/t-1", tunnel.ENV_FINGERPRINT: FP,
                   tunnel.ENV_CYCLE: "7", tunnel.ENV_PATH: "/srv/a b", tunnel.ENV_EPOCH: "3"}


# --- the upgrade handshake, against a fake control plane on a socket pair (no network) ---------

class _Stream:
    """One end of a socket pair standing for the TCP connection (TCP options are no-ops)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def setsockopt(self, *args: object) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


class FakeControlPlane:
    """Answers the tunnel's request with ``answer``, records the request head, then (after a 101)
    answers the first bytes of the stream in upper case."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: bytes) -> None:
        self.answer = answer
        self.requests: List[bytes] = []
        self.addresses: List[object] = []
        ours, self._theirs = socket.socketpair()

        def connect(address, timeout=None):
            self.addresses.append(address)
            return _Stream(ours)

        monkeypatch.setattr(tunnel.socket, "create_connection", connect)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn = self._theirs
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(1)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head)
            conn.sendall(self.answer)
            if self.answer.startswith(b"HTTP/1.1 101"):
                conn.sendall(conn.recv(100).upper())

    def close(self) -> None:
        self.thread.join(5)


def _env(port: int = 8080, **over: str) -> Dict[str, str]:
    env = {tunnel.ENV_URL: f"http://127.0.0.1:{port}/rsync/v1/tasks/t-1", tunnel.ENV_FINGERPRINT: "",
           tunnel.ENV_CYCLE: "3", tunnel.ENV_PATH: "/srv/a b", "RSYNC_PASSWORD": "pw-secret",
           tunnel.ENV_EPOCH: "5"}
    env.update(over)
    return env


def test_open_session_upgrades_with_the_tasks_credentials_cycle_and_path(monkeypatch):
    cp = FakeControlPlane(monkeypatch, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: go2cloud-rsync\r\n"
                                       b"Connection: Upgrade\r\n\r\n@RSYNCD: ")
    try:
        stream = tunnel.open_session(_env())
        try:
            # what came with the answer's head is the start of rsync's stream, not lost
            assert stream.recv() == b"@RSYNCD: "
            stream.send(b"@rsyncd: 32.0\n")
            assert stream.recv() == b"@RSYNCD: 32.0\n"
        finally:
            stream.close()
    finally:
        cp.close()
    assert cp.addresses == [("127.0.0.1", 8080)]
    lines = cp.requests[0].decode("ascii").split("\r\n")
    assert lines[0] == "POST /rsync/v1/tasks/t-1/session HTTP/1.1"
    assert "Host: 127.0.0.1:8080" in lines
    assert "Authorization: Bearer pw-secret" in lines and "X-Go2cloud-Cycle: 3" in lines
    assert "X-Go2cloud-Path: /srv/a%20b" in lines
    assert "X-Go2cloud-Epoch: 5" in lines  # the agent's session epoch (fencing)
    assert "Upgrade: go2cloud-rsync" in lines and "Connection: Upgrade" in lines


def test_open_session_reports_a_refusal_with_the_servers_message(monkeypatch):
    body = b'{"error": {"code": "auth_failed", "message": "the rsync credentials are wrong"}}'
    cp = FakeControlPlane(monkeypatch, b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        with pytest.raises(TunnelError, match=r"HTTP 401.*the rsync credentials are wrong \(auth_failed\)"):
            tunnel.open_session(_env())
    finally:
        cp.close()


def test_open_session_refuses_an_answer_that_is_not_http(monkeypatch):
    cp = FakeControlPlane(monkeypatch, b"@RSYNCD: 32.0\n\r\n\r\n")
    try:
        with pytest.raises(TunnelError, match="not HTTP"):
            tunnel.open_session(_env())
    finally:
        cp.close()


@pytest.mark.parametrize("over", [{"RSYNC_PASSWORD": ""}, {tunnel.ENV_CYCLE: "x"}, {tunnel.ENV_PATH: "srv"}])
def test_open_session_needs_its_settings_before_connecting(over):
    with pytest.raises(TunnelError, match="RSYNC_PASSWORD"):
        tunnel.open_session(_env(**over))  # the unit fence would refuse any connection


def test_open_session_refuses_plain_http_off_loopback():
    with pytest.raises(TunnelError, match="loopback"):
        tunnel.open_session(_env(**{tunnel.ENV_URL: "http://10.0.0.1:8080/rsync/v1/tasks/t-1"}))


# --- the pump -------------------------------------------------------------------------------------

def test_pump_copies_both_ways_and_exits_with_the_targets_status():
    ours, theirs = socket.socketpair()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    payload = os.urandom(300_000)
    os.write(in_w, b"hello target")
    os.close(in_w)

    def target() -> None:
        got = b""
        while len(got) < len(b"hello target"):
            got += theirs.recv(100)
        theirs.sendall(tunnel.FRAME.pack(0, len(payload)) + payload + tunnel.FRAME.pack(1, 4) + b"oops"
                       + tunnel.FRAME.pack(2, 4) + struct.pack(">i", 23))

    out = bytearray()

    def rsync_reads() -> None:
        while True:
            chunk = os.read(out_r, 1 << 20)
            if not chunk:
                return
            out.extend(chunk)

    threads = [threading.Thread(target=target), threading.Thread(target=rsync_reads)]
    for t in threads:
        t.start()
    status = tunnel.pump(tunnel.Stream(ours), in_r, out_w)
    os.close(out_w)
    for t in threads:
        t.join(5)
    assert status == 23 and bytes(out) == payload


def test_pump_stops_waiting_for_a_stalled_target_once_rsync_has_gone(monkeypatch):
    """rsync waits for its remote shell to exit; after its --timeout it closes our stdin. A
    stalled connection must not keep the tunnel (and so rsync and the cycle) forever."""
    monkeypatch.setattr(tunnel, "EXIT_WAIT_S", 0.3)
    ours, theirs = socket.socketpair()  # the target never answers
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(in_w)
    done: List[int] = []
    t = threading.Thread(target=lambda: done.append(tunnel.pump(tunnel.Stream(ours), in_r, out_w)),
                         daemon=True)
    t.start()
    t.join(10)
    theirs.close()
    assert done == [tunnel.EXIT_LOST]


def test_pump_ends_a_connection_that_brings_nothing_for_its_idle_limit():
    """rsync's own --timeout does not see a stall while its keep-alives still fit in the pipe
    and socket buffers; the daemon's keep-alives come every half of it, so the tunnel ends a
    connection silent for twice rsync's timeout."""
    ours, theirs = socket.socketpair()  # the target is alive but sends nothing
    in_r, in_w = os.pipe()  # rsync keeps its end open
    out_r, out_w = os.pipe()
    done: List[int] = []
    stream = tunnel.Stream(ours)
    t = threading.Thread(target=lambda: done.append(tunnel.pump(stream, in_r, out_w, idle_s=0.3)),
                         daemon=True)
    t.start()
    t.join(10)
    os.close(in_w)
    theirs.close()
    assert done == [tunnel.EXIT_LOST]
