"""Every channel through an HTTP proxy (issue 12, item 3), against a real tinyproxy.

The agent runs in a network namespace whose only reachable address is the proxy
(:mod:`tests.support.proxynet`); the server listens on the host's 127.0.0.1, which the namespace
cannot reach directly (checked first). So an import, a file-level migration (rsync through the
tunnel) and a block-level migration that complete with artifacts equal to the source prove that
the API, file data and block data all went through the proxy with CONNECT, the server's
certificate pinned end to end. Refusals (407 without and with wrong credentials, 403) and a
wrong pin through the proxy end with their own error types and exit codes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from go2cloud_server.manifest import build, diff
from tests.integration.test_e2e_block import sha256, wait_cycle
from tests.integration.test_e2e_migration import _excluded, _image
from tests.support import proxynet, tree
from tests.support.proxynet import NsAgent, ProxyNet

pytestmark = [pytest.mark.integration, pytest.mark.root]

_why = proxynet.available()
if _why:
    pytestmark.append(pytest.mark.skip(reason=_why))

CREDS = "agent:Pa55-w0rd"


@pytest.fixture
def nets(tmp_path):
    made = []

    def make(**kw) -> ProxyNet:
        net = ProxyNet(tmp_path, **kw)
        made.append(net)
        return net.start()

    yield make
    for net in made:
        net.close()


def _import(server, agent: NsAgent, wg: str, *extra: str):
    server.j("workgroup", "create", wg)
    code = server.new_code(wg, uses=3)
    agent.env["GO2CLOUD_TOKEN_CODE"] = code["token_code"]
    return agent.run_in_ns("--home", str(agent.home), "--no-prompt", "--yes", "--import-only",
                           "--server", server.url, "--server-fingerprint", agent.server.fingerprint,
                           "--token-id", code["token_id"], *extra)


def _random_disk(path: Path, mib: int = 24) -> Path:
    """A disk image: random data with a hole in the middle."""
    with open(path, "wb") as fh:
        fh.write(os.urandom(10 << 20))
        fh.seek((mib - 10) << 20)
        fh.write(os.urandom(10 << 20))
    return path


@pytest.mark.slow
def test_import_file_and_block_migrations_through_the_proxy_only(server, nets, tmp_path, _needs_rsync):
    net = nets(basic_auth=CREDS)
    assert net.direct_refused("127.0.0.1", server.port), "the namespace must not reach the server directly"
    # the standard environment at import; the import records it for the agent's later runs
    agent = NsAgent(tmp_path / "home", server, net, env={"https_proxy": net.url(CREDS), "no_proxy": ""})
    agent.home.mkdir()
    server.j("workgroup", "create", "wg-proxy")
    agent.start(code=server.new_code("wg-proxy", uses=1))
    sid = agent.wait_imported(timeout=120)
    source = json.loads((agent.home / "state" / "source.json").read_text())
    assert source["proxy"] == net.url(CREDS)
    assert f"Connecting through the proxy {net.url()}" in agent.output()

    # file level: rsync through the tunnel, through the proxy
    src = tree.build(tmp_path / "src")
    server.j("migration", "start", "--source", sid, "--path", str(src))
    server.wait_task(sid, "pending", timeout=300)
    (art,) = server.artifacts(sid)
    assert diff(build(src, exclude=_excluded), build(_image(art, src))) == []
    server.j("migration", "complete", "--source", sid)
    server.wait_task(sid, "completed", timeout=120)

    # block level: the block receiver through the proxy
    disk = _random_disk(tmp_path / "disk.img")
    server.j("migration", "start", "--source", sid, "--mode", "block", "--disk", str(disk),
             "--snapshot", "live")
    art = wait_cycle(server, sid, 1, timeout=300)
    # bit for bit (a raw image with no filesystem: the server's filesystem check has nothing to say)
    want = sha256(disk)
    assert art["sha256"] == want and sha256(Path(art["path"])) == want

    connects = net.connects()
    assert any(f"CONNECT 127.0.0.1:{server.port}" in line for line in connects), net.log()[-3000:]
    out = agent.output()
    assert "Traceback" not in out
    # the proxy password is never printed or logged
    logs = "".join(p.read_text(errors="replace") for p in (agent.home / "Logs").glob("*.log"))
    assert "Pa55-w0rd" not in out and "Pa55-w0rd" not in logs


def test_proxy_refusals_and_the_pin_through_the_proxy(server, nets, tmp_path):
    net = nets(basic_auth=CREDS)
    # 407 without credentials (--proxy)
    agent = NsAgent(tmp_path / "h1", server, net)
    r = _import(server, agent, "wg-p1", "--proxy", net.url())
    assert r.returncode == 16, (r.returncode, r.stdout, r.stderr)
    assert f"the proxy {net.url()} refused the connection to 127.0.0.1:{server.port} (HTTP 407" in r.stderr
    assert "none were given" in r.stderr and "http://USER:PASSWORD@HOST:PORT" in r.stderr

    # 407 with wrong credentials (GO2CLOUD_PROXY): the message names the proxy, not the password
    agent = NsAgent(tmp_path / "h2", server, net, env={"GO2CLOUD_PROXY": net.url("agent:wrong-secret")})
    r = _import(server, agent, "wg-p2")
    assert r.returncode == 16, (r.returncode, r.stdout, r.stderr)
    assert "refused the user name and password" in r.stderr and "wrong-secret" not in r.stdout + r.stderr

    # the pin is checked on the server's own certificate through the CONNECT tunnel
    agent = NsAgent(tmp_path / "h3", server, net, env={"GO2CLOUD_PROXY": net.url(CREDS)})
    agent.server = type("S", (), {"url": server.url, "fingerprint": "sha256:" + "ab" * 32})()  # type: ignore
    r = _import(server, agent, "wg-p3")
    assert r.returncode == 11, (r.returncode, r.stdout, r.stderr)
    assert "does not match the pinned fingerprint" in r.stderr

    # the same agent with the right pin goes through
    agent.server = server
    r = _import(server, agent, "wg-p4")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert any(f"CONNECT 127.0.0.1:{server.port}" in line for line in net.connects()), net.log()[-2000:]

    # 403: the proxy allows CONNECT to other ports only
    closed = nets(connect_ports=[443])
    agent = NsAgent(tmp_path / "h5", server, closed, env={"https_proxy": closed.url()})
    r = _import(server, agent, "wg-p5")
    assert r.returncode == 16, (r.returncode, r.stdout, r.stderr)
    assert "(HTTP 403" in r.stderr and f"does not allow CONNECT to 127.0.0.1:{server.port}" in r.stderr


def test_no_proxy_bypasses_the_proxy(server, nets, tmp_path):
    """A host in no_proxy is connected to directly: from the namespace that fails (the server is
    not reachable without the proxy), with the usual unreachable error, not the proxy's."""
    net = nets(basic_auth=CREDS)
    agent = NsAgent(tmp_path / "h", server, net,
                    env={"GO2CLOUD_PROXY": net.url(CREDS), "GO2CLOUD_NO_PROXY": "127.0.0.0/8"})
    r = _import(server, agent, "wg-np")
    assert r.returncode == 10, (r.returncode, r.stdout, r.stderr)
    assert "cannot reach the control plane" in r.stderr and "through the proxy" not in r.stderr
    assert not net.connects()
