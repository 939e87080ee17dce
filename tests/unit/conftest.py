"""Unit tests are fenced: they cannot start processes or open network connections.

A test that needs one says so with ``@pytest.mark.allow_subprocess`` or
``@pytest.mark.allow_network`` (and then it probably belongs in tests/integration). HTTP to the
control plane is faked at the ``requests`` boundary with the ``responses`` library, which never
opens a socket.
"""

from __future__ import annotations

import socket
import subprocess

import pytest


class FenceViolation(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _fence(request, monkeypatch):
    if not request.node.get_closest_marker("allow_subprocess"):
        def no_popen(self, args, *a, **kw):
            raise FenceViolation(f"unit test tried to start a process: {args!r}")

        monkeypatch.setattr(subprocess.Popen, "__init__", no_popen)
    if not request.node.get_closest_marker("allow_network"):
        real_connect = socket.socket.connect

        def no_connect(self, address):
            if self.family == socket.AF_UNIX:
                return real_connect(self, address)
            raise FenceViolation(f"unit test tried to connect to {address!r}")

        monkeypatch.setattr(socket.socket, "connect", no_connect)
    yield
