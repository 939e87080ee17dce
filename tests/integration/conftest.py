from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.support import servers
from tests.support.harness import REPO, Agent, Server

server = servers.server  # a fixture: the test's own server, or its module's shared one
shared_server = servers.shared_server  # a fixture


@pytest.fixture(scope="session", autouse=True)
def _needs_rsync() -> None:
    # Integration tests need the real rsync; CI installs it (scripts/setup.sh). Fail, never skip.
    assert shutil.which("rsync"), "rsync is not installed: run ./scripts/setup.sh as root"


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packages built by packaging/build.py (once per session; PyInstaller's work dir is
    cached under build/ so an unchanged tree rebuilds in seconds)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(REPO / "packaging" / "build.py"), "--out", str(out),
         "--work", str(REPO / "build" / "pyinstaller")],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture
def agents(tmp_path: Path, server: Server) -> Iterator[AgentFactory]:
    factory = AgentFactory(tmp_path, server)
    yield factory
    factory.close()


class AgentFactory:
    def __init__(self, tmp_path: Path, server: Server):
        self.tmp_path = tmp_path
        self.server = server
        self.started: List[Agent] = []

    def __call__(self, name: str = "agent") -> Agent:
        agent = Agent(self.tmp_path / f"home-{name}", self.server)
        self.started.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.started:
            try:
                agent.stop()
            finally:
                agent.kill()
