"""The operator client (go2cloud_server/opclient.py: http.client and ssl of the standard library)
against a real ``go2cloud_server serve``: real TLS, real HTTP, the certificate pinned.

- ``source list`` works and imports nothing of the server, nor requests or cryptography (issue
  16: operator commands start fast; the timings are in docs/performance.md, never asserted);
- a wrong pin is refused after the handshake, before the request (with the admin token) is
  sent: the server never sees it; no pin at all means CA verification, which a self-signed
  server fails;
- through a real forward proxy (tinyproxy) with CONNECT and basic authentication, as
  requests did with ``https_proxy``; ``no_proxy`` goes direct; a refused tunnel (wrong proxy
  credentials) ends as "cannot reach" (exit 10).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from go2cloud_server.errors import NotFound, ServerUnreachable
from go2cloud_server.opclient import Endpoint, OperatorClient, resolve
from tests.support.harness import REPO, Server, _env, wait_for
from tests.support.importcheck import SERVER_ONLY, heavy, imported, stderr_text

pytestmark = pytest.mark.integration


def _log_lines(server: Server, fragment: str) -> List[str]:
    text = Path(server.log.name).read_text(errors="replace")
    return [line for line in text.splitlines() if fragment in line]


@pytest.mark.shared_server
def test_source_list_against_a_running_server_imports_no_server_module(server: Server):
    wg = f"oc-{uuid.uuid4().hex[:6]}"
    server.j("workgroup", "create", wg)
    env = {"GO2CLOUD_DATA_DIR": str(server.data_dir)}
    proc, mods = imported("source", "list", "--workgroup", wg, env=env)
    assert proc.returncode == 0, stderr_text(proc)
    assert proc.stdout == "No sources imported yet.\n"
    assert heavy(mods, SERVER_ONLY) == set()
    assert {"go2cloud_server.opclient", "http.client", "ssl"} <= mods  # it did talk to the server
    # the same answer as the API gives, through the CLI's --json
    proc, mods = imported("source", "list", "--json", env=env)
    assert proc.returncode == 0, stderr_text(proc)
    assert json.loads(proc.stdout) == server.api("GET", "/sources")
    assert heavy(mods, SERVER_ONLY) == set()


@pytest.mark.shared_server
def test_a_wrong_pin_is_refused_before_the_request_is_sent(server: Server):
    probe = f"/workgroups/pin-probe-{uuid.uuid4().hex[:8]}"
    good = resolve(server.data_dir, None, None)
    assert good.fingerprint == server.fingerprint and good.admin_token
    wrong = Endpoint(url=good.url, fingerprint="sha256:" + "ab" * 32, admin_token=good.admin_token)
    with pytest.raises(ServerUnreachable) as refused:
        OperatorClient(wrong, timeout=10).request("GET", probe)
    assert refused.value.exit_code == 10
    assert str(refused.value) == (
        f"TLS to {good.url} failed (the certificate's fingerprint does not match the pinned one): "
        "check --server-fingerprint or the certificate in <data-dir>/tls/"
    )
    # the same request with the right pin reaches the server (and is logged), so the wrong one
    # would have been logged too had it been sent
    with pytest.raises(NotFound):
        OperatorClient(good, timeout=10).request("GET", probe)
    logged = wait_for(lambda: _log_lines(server, f"GET /api/v1{probe} -> 404"), 10, "the probe logged")
    assert len(logged) == 1

    # no pin at all: the system CAs, which do not know the server's self-signed certificate
    unpinned = Endpoint(url=good.url, fingerprint=None, admin_token=good.admin_token)
    with pytest.raises(ServerUnreachable, match=r"TLS to .* failed \(certificate verification failed\)"):
        OperatorClient(unpinned, timeout=10).request("GET", probe)
    assert len(_log_lines(server, f"GET /api/v1{probe} ")) == 1


@pytest.mark.shared_server
def test_requests_bodies_queries_and_errors_through_the_real_api(server: Server):
    op = OperatorClient(resolve(server.data_dir, None, None), timeout=10)
    name = f"東京-{uuid.uuid4().hex[:6]}"  # non-ASCII in the body and, percent-encoded, in the path
    created = op.request("POST", "/workgroups", {"name": name, "description": "d", "tags": {"k": "v"}})
    assert created["name"] == name and created["tags"] == {"k": "v"}
    assert op.request("GET", f"/workgroups/{OperatorClient.seg(name)}")["id"] == created["id"]
    code = op.request("POST", f"/workgroups/{OperatorClient.seg(name)}/codes", {"uses": 2})
    listed = op.request("GET", "/codes", params={"workgroup": name, "unused": None})
    assert [c["token_id"] for c in listed["codes"]] == [code["token_id"]]
    revoked = op.request("POST", f"/codes/{OperatorClient.seg(code['token_id'])}/revoke")  # no body
    assert revoked["token_id"] == code["token_id"]
    with pytest.raises(NotFound, match="no workgroup"):
        op.request("DELETE", "/workgroups/no-such-workgroup")
    op.request("DELETE", f"/workgroups/{OperatorClient.seg(name)}")
    with pytest.raises(NotFound):
        op.request("GET", f"/workgroups/{OperatorClient.seg(name)}")


# ----------------------------------------------------------------------------------------------
# through a forward proxy
class _Tinyproxy:
    def __init__(self, tmp_path: Path, connect_port: int, basic_auth: Optional[str] = None):
        assert shutil.which("tinyproxy"), "tinyproxy is not installed: run ./scripts/setup.sh as root"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_file = tmp_path / "tinyproxy.log"
        conf = tmp_path / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "Allow 127.0.0.1", "LogLevel Info",
                 f'LogFile "{self.log_file}"', f"ConnectPort {connect_port}"]
        if basic_auth:
            user, _, password = basic_auth.partition(":")
            lines.append(f"BasicAuth {user} {password}")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.proc.poll() is None, f"tinyproxy exited {self.proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, 15, "tinyproxy to listen")

    def connects(self) -> List[str]:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if "CONNECT" in line and "Request" in line]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _cli(server: Server, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = _env({"GO2CLOUD_DATA_DIR": str(server.data_dir), **env})
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "https_proxy", "HTTPS_PROXY"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "go2cloud_server", *args], capture_output=True, text=True,
                          env=full, timeout=60, cwd=str(REPO), stdin=subprocess.DEVNULL)


@pytest.mark.shared_server
def test_through_a_forward_proxy_with_connect(server: Server, tmp_path: Path):
    proxy = _Tinyproxy(tmp_path, server.port, basic_auth="op:Pa55-w0rd")
    try:
        target = f"CONNECT 127.0.0.1:{server.port}"
        ok = _cli(server, {"https_proxy": f"http://op:Pa55-w0rd@127.0.0.1:{proxy.port}"}, "workgroup", "list",
                  "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == server.api("GET", "/workgroups")
        assert len([c for c in wait_for(proxy.connects, 10, "the CONNECT logged") if target in c]) == 1

        # the host in no_proxy: straight to the server, the proxy sees nothing more
        direct = _cli(server, {"https_proxy": f"http://op:Pa55-w0rd@127.0.0.1:{proxy.port}",
                               "no_proxy": "localhost,127.0.0.1"}, "workgroup", "list")
        assert direct.returncode == 0, direct.stderr
        assert len([c for c in proxy.connects() if target in c]) == 1

        # wrong credentials: the proxy refuses the tunnel (tinyproxy says 401), the command cannot
        # reach the server
        denied = _cli(server, {"HTTPS_PROXY": f"http://op:wrong@127.0.0.1:{proxy.port}"}, "workgroup", "list")
        assert denied.returncode == 10, (denied.returncode, denied.stderr)
        assert denied.stderr.startswith(f"error: cannot reach the server at {server.url} (")
        assert "(Tunnel connection failed: 401 Unauthorized)" in denied.stderr, denied.stderr
        assert denied.stderr.count("\n") == 1, denied.stderr
    finally:
        proxy.close()


@pytest.mark.shared_server
def test_a_proxy_other_than_http_is_refused_with_what_to_do(server: Server):
    proc = _cli(server, {"all_proxy": "socks5://127.0.0.1:1080"}, "workgroup", "list")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: proxy socks5://127.0.0.1 (from https_proxy or all_proxy): only an http:// "
                           "proxy is supported; fix the variable, or name the server's host in no_proxy\n")
