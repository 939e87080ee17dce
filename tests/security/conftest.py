"""Attack tests (docs/security.md): each finding of the trust review reproduced from outside, by a
hostile source with valid credentials, a code holder of another workgroup, an outsider or a
network observer, against the real server, rsync and agent on loopback. Each asserts that nothing
was read, written, leaked or crashed.

The integration fixtures (``server``, ``agents``, the check that rsync is installed) are shared
with tests/integration.
"""

from __future__ import annotations

from tests.integration.conftest import AgentFactory, _needs_rsync, agents  # noqa: F401 - fixtures
from tests.support import servers

server = servers.server  # a fixture: the test's own server, or its module's shared one
shared_server = servers.shared_server  # a fixture

__all__ = ["AgentFactory"]
