"""Fault tests (docs/reliability.md): the product put through faults from outside (a cloned
identity, kill -9 of agent and server, a full target or agent home, resets, stalls and outages of
the network) against the real server, rsync and agent on loopback. Every case ends with the
artifact equal to the source, unattended, with bounded re-sends.

The integration fixtures (``server``, ``agents``, the check that rsync is installed) are shared
with tests/integration. Cases that take minutes are marked ``slow`` (the fast lane deselects them
with ``-m "not slow"``).
"""

from __future__ import annotations

from tests.integration.conftest import AgentFactory, _needs_rsync, agents  # noqa: F401 - fixtures
from tests.support import servers

server = servers.server  # a fixture: the test's own server, or its module's shared one
shared_server = servers.shared_server  # a fixture

__all__ = ["AgentFactory"]
