"""Load hygiene of the control plane (issue 17, item 7; docs/reliability.md section 7).

The real server over HTTPS on loopback. Before the fix, 1,100 imports against a full workgroup
spent 41 CPU-s of key derivation (scrypt, deliberately slow) before the "workgroup full" check,
and API answers waited for the client's delayed ACK (no TCP_NODELAY).
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from go2cloud_server import rules
from go2cloud_server.service.codes import hash_code
from tests.support.harness import Server

pytestmark = pytest.mark.integration


def _ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback; the pin is not what these tests are about
    return ctx


def _request(tls: ssl.SSLSocket, method: str, path: str, body: Any = None) -> Tuple[int, Dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else b""
    tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = tls.recv(65536)
        assert chunk, "connection closed before the answer"
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += tls.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length])


def _import_body(code: Dict[str, Any], i: int) -> Dict[str, Any]:
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    return {"token_id": code["token_id"], "token_code": code["token_code"], "public_key": pub,
            "agent_version": "test", "inventory": {"hostname": f"h{i}", "machine_id": f"{i:032x}"}}


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_imports_into_a_full_workgroup_are_refused_without_key_derivation(server: Server) -> None:
    server.j("workgroup", "create", "wg-full")
    code = server.new_code("wg-full", uses=rules.MAX_SOURCES_PER_WORKGROUP + 200)
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            _ctx().wrap_socket(raw, server_hostname="x") as tls:
        for i in range(rules.MAX_SOURCES_PER_WORKGROUP):
            status, doc = _request(tls, "POST", "/api/v1/sources/import", _import_body(code, i))
            assert status == 201, doc
        # what one derivation costs in CPU on this machine (the server's is the same scrypt)
        salt = os.urandom(16)
        t0 = time.process_time()
        for _ in range(3):
            hash_code("x" * 28, salt)
        derive_cpu = (time.process_time() - t0) / 3
        refused = 40
        cpu0 = _cpu_s(server.proc.pid)
        for i in range(refused):
            status, doc = _request(tls, "POST", "/api/v1/sources/import", _import_body(code, 1000 + i))
            assert status == 422 and doc["error"]["code"] == "import_rejected", doc
            assert "already has 50 sources" in doc["error"]["message"]
        spent = _cpu_s(server.proc.pid) - cpu0
    # one derivation per refused import would cost refused * derive_cpu; allow a tenth of it
    assert spent < refused * derive_cpu / 10, (
        f"{refused} refused imports cost the server {spent:.2f} CPU-s; one derivation costs "
        f"{derive_cpu * 1000:.0f} ms")
    # the refused imports used nothing: every remaining use of the code is still there
    codes = server.j("code", "list", "--workgroup", "wg-full")["codes"]
    assert codes[0]["uses_left"] == 200


def test_a_revoked_code_is_refused_without_key_derivation(server: Server) -> None:
    server.j("workgroup", "create", "wg-dead")
    revoked = server.new_code("wg-dead", uses=5)
    server.j("code", "revoke", revoked["token_id"])
    salt = os.urandom(16)
    t0 = time.process_time()
    hash_code("x" * 28, salt)
    derive_cpu = time.process_time() - t0
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            _ctx().wrap_socket(raw, server_hostname="x") as tls:
        cpu0 = _cpu_s(server.proc.pid)
        for i in range(20):
            status, doc = _request(tls, "POST", "/api/v1/sources/import", _import_body(revoked, i))
            assert status == 403 and doc["error"]["code"] == "code_revoked", doc
        spent = _cpu_s(server.proc.pid) - cpu0
    assert spent < 20 * derive_cpu / 10, f"20 imports with a revoked code cost {spent:.2f} CPU-s"


_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64


def _server_side_socket(pid: int, client: socket.socket) -> socket.socket:
    """A duplicate of the server's own descriptor of ``client``'s connection (pidfd_getfd, root)."""
    lport = client.getsockname()[1]
    rport = client.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1], f[2]
        if int(local.split(":")[1], 16) == rport and int(remote.split(":")[1], 16) == lport:
            inode = f[9]
    assert inode, "the server's end of the connection is not in /proc/net/tcp"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target == f"socket:[{inode}]":
            libc = ctypes.CDLL(None, use_errno=True)
            pidfd = os.pidfd_open(pid)
            try:
                dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                assert dup >= 0, os.strerror(ctypes.get_errno())
            finally:
                os.close(pidfd)
            return socket.socket(fileno=dup)
    raise AssertionError(f"socket:[{inode}] is none of the server's descriptors")


def test_accepted_connections_have_tcp_nodelay(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            _ctx().wrap_socket(raw, server_hostname="x") as tls:
        status, _ = _request(tls, "GET", "/api/v1/time")
        assert status == 200
        theirs = _server_side_socket(server.proc.pid, tls)
        try:
            assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            theirs.close()


def test_listen_backlog_is_sized_for_a_fleet(server: Server) -> None:
    """The listening socket's backlog (``ss -ltn``: Send-Q of a listener) is 4096 by default, or
    net.core.somaxconn where that is lower (the server warns then)."""
    import subprocess

    out = subprocess.run(["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    backlog = int(out[2])
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert backlog == min(4096, cap)
    if cap < 4096:
        assert "net.core.somaxconn" in Path(server.log.name).read_text()
