from __future__ import annotations

import pytest

from go2cloud_client.home import Home


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home")
    h.ensure()
    return h
