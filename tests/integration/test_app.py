"""The composition root (``go2cloud_server.app``) builds, runs and closes the whole server in this
process, without click, with the clock it is given."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from go2cloud_server import children
from go2cloud_server.app import ServeOptions, ServerApp
from go2cloud_server.clock import OffsetClock

pytestmark = pytest.mark.integration


def _get_json(url: str) -> dict:
    parts = urlsplit(url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a self-signed certificate; only the clock is checked here
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx, timeout=30)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return json.loads(resp.read())
    finally:
        conn.close()


def test_server_app_serves_with_the_injected_clock_and_cleans_up(tmp_path: Path) -> None:
    registry = children.REGISTRY  # build() installs the server's children registry: put it back after
    clock = OffsetClock(-3600)
    data_dir = tmp_path / "data"
    app = ServerApp(ServeOptions(host="127.0.0.1", port=0, data_dir=data_dir, heartbeat_interval=1,
                                 clock=clock))
    thread = None
    try:
        app.build()
        assert app.service is not None and app.scheduler is not None
        assert app.service.clock is clock and app.scheduler.clock is clock
        thread = threading.Thread(target=app.serve_forever, daemon=True)
        thread.start()
        info = json.loads((data_dir / "server.json").read_text())
        assert info["url"] == app.local_url and info["pid"] == os.getpid()
        assert info["fingerprint"] == app.fingerprint
        doc = _get_json(app.local_url + "/api/v1/time")
        # the server's wall clock is the injected one: an hour behind this machine's
        assert 3500 < time.time() - doc["server_time_epoch"] < 3700
    finally:
        if thread is not None:  # (shutdown waits for serve_forever: only once it runs)
            app.shutdown()
            thread.join(30)
        app.close()
        children.REGISTRY = registry
    assert thread is not None and not thread.is_alive()
    assert not (data_dir / "server.json").exists()
