from __future__ import annotations

import logging

import pytest

from go2cloud_client.home import Home


@pytest.fixture(autouse=True)
def _no_snapshot_driver_step(monkeypatch):
    """Imports in unit tests skip the snapshot driver step (it probes the host and asks the
    package manager); tests/unit/agent/test_hostprep.py drives that step with fakes."""
    monkeypatch.setenv("GO2CLOUD_SNAPSHOT_DRIVER", "skip")


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home")
    h.ensure()
    return h


@pytest.fixture
def reset_logging():
    """Remove the log handlers a CLI run installed on the root logger (used by the CLI tests)."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_go2cloud", False):
            root.removeHandler(h)
            h.close()
