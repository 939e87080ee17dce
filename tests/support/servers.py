"""Server fixtures shared by tests/integration, tests/security and tests/faults (their conftests
import them).

``server`` is a real ``go2cloud_server serve`` of the test's own (tmp_path data dir, started and
stopped around the test). A test that only needs *a* server -- not its own data dir, flags,
clock or restarts -- is marked ``shared_server`` (module-level ``pytestmark`` when every test of
the module qualifies): its ``server`` is then one server started once for the module, and the
test keeps to its own workgroup and source names. Never mark a test that stops, kills or
restarts the server, starts it with other flags or environment, or counts everything on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.harness import Server


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the ``shared_server`` tests of a module."""
    srv = Server(tmp_path_factory.mktemp("shared-server") / "server-data").start()
    yield srv
    srv.stop()


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.node.get_closest_marker("shared_server"):
        srv = request.getfixturevalue("shared_server")
        assert srv.proc is not None and srv.proc.poll() is None, "the module's shared server died"
        yield srv
        return
    srv = Server(tmp_path / "server-data").start()
    yield srv
    srv.stop()
