"""Helpers of the agent's network fault tests: the real server, an agent whose every connection
(API, rsync tunnel, block receiver) goes through the TCP fault proxy.

The server listens on 127.0.0.1:P and advertises ``--public-host 127.0.0.2`` (so the targets it
hands out are ``https://127.0.0.2:P/...``); the proxy listens on 127.0.0.2:P and forwards to
127.0.0.1:P; the agent's ``--server`` is the proxy. The pinned fingerprint still matches: the
proxy works at the TCP level and TLS passes through it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tests.support.faultproxy import FaultProxy
from tests.support.harness import Agent, Server, wait_for

PROXY_HOST = "127.0.0.2"


class _Via:
    """What :class:`Agent` needs of a server (url, fingerprint), pointing at the proxy."""

    def __init__(self, server: Server, proxy: FaultProxy) -> None:
        self.url = f"https://{proxy.host}:{proxy.port}"
        self.fingerprint = server.fingerprint


class Proxied:
    def __init__(self, tmp_path: Path, agent_env: Optional[Dict[str, str]] = None) -> None:
        self.tmp_path = tmp_path
        self.server = Server(tmp_path / "server-data", extra_args=["--public-host", PROXY_HOST]).start()
        port = self.server.port
        self.proxy = FaultProxy(("127.0.0.1", port), listen=(PROXY_HOST, port)).start()
        self.agent_env = dict(agent_env or {})
        self.agents: List[Agent] = []

    def agent(self, name: str, home: Optional[Path] = None) -> Agent:
        via = _Via(self.server, self.proxy)
        agent = Agent(home or self.tmp_path / f"home-{name}", via)  # type: ignore[arg-type]
        agent.home.mkdir(parents=True, exist_ok=True)
        self.agents.append(agent)
        return agent

    def import_agent(self, name: str, home: Optional[Path] = None, config: str = "") -> Tuple[Agent, str]:
        wg = f"wg-{name}"
        self.server.j("workgroup", "create", wg)
        agent = self.agent(name, home)
        (agent.home / "config.yaml").write_text(config)
        agent.start(code=self.server.new_code(wg, uses=1))
        return agent, agent.wait_imported()

    def close(self) -> None:
        for agent in self.agents:
            try:
                agent.stop()
            finally:
                agent.kill()
        self.proxy.close()
        self.server.stop()


def proxied_env(tmp_path: Path) -> Iterator[Proxied]:
    """Body of the ``proxied`` fixture of the test modules."""
    p = Proxied(tmp_path)
    try:
        yield p
    finally:
        p.close()


def agent_log(agent: Agent) -> str:
    log = agent.home / "Logs" / "go2cloud_client.log"
    return log.read_text(errors="replace") if log.exists() else ""


def status(agent: Agent) -> Dict[str, Any]:
    path = agent.home / "state" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def task(server: Server, sid: str) -> Dict[str, Any]:
    return server.source_migration(sid)["tasks"][0]


def wait_cycle_done(server: Server, sid: str, n: int, timeout: float) -> Dict[str, Any]:
    """Wait for the artifact of cycle ``n`` (a failed task fails the test at once)."""
    def done() -> Optional[Dict[str, Any]]:
        t = task(server, sid)
        if t["status"] == "failed":
            raise AssertionError(f"cycle {n} failed: {t}")
        arts = {a["cycle"]: a for a in server.artifacts(sid)}
        return arts.get(n)

    return wait_for(done, timeout, f"the artifact of cycle {n}", interval=0.5)


def random_tree(root: Path, files: int, size: int, seed: int = 1) -> Path:
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(rng.randbytes(size))
    (root / "small.txt").write_text("hello\n")
    os.symlink("small.txt", root / "link")
    return root


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))
