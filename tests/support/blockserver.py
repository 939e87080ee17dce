"""Test-only: the real HTTPS server of go2cloud_server (``httpapi.ApiServer``, TLS, route table)
with a :class:`BlockReceiver` for one fixed task and token, in a thread of the test process.
The control plane's service is not involved (its routes answer nothing here)."""

from __future__ import annotations

import hmac
import threading
from pathlib import Path
from typing import List, Optional

from go2cloud_server import tls
from go2cloud_server.blockrx import BlockReceiver
from go2cloud_server.blockstore import BlockTaskStore
from go2cloud_server.httpapi import Api, ApiServer

TASK = "t-blocktest"
TOKEN = "tok-" + "x" * 40


class BlockServer:
    def __init__(self, data_dir: Path, task: str = TASK, token: str = TOKEN, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.task = task
        self.token = token
        self.store = BlockTaskStore(self.data_dir / "tasks" / task / "block")
        self.httpd: Optional[ApiServer] = None
        self._thread: Optional[threading.Thread] = None

    def resolve(self, task: str, token: str) -> Optional[BlockTaskStore]:
        if task == self.task and hmac.compare_digest(token.encode(), self.token.encode()):
            return self.store
        return None

    def start(self) -> BlockServer:
        cert, key = tls.ensure_certificate(self.data_dir / "tls", [self.host])
        self.fingerprint = tls.fingerprint(cert)
        api = Api(None, None, "unused-admin-token", block_receiver=BlockReceiver(self.resolve))  # type: ignore[arg-type]
        self.httpd = ApiServer((self.host, 0), api, tls.server_context(cert, key))
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="block-server", daemon=True)
        self._thread.start()
        return self

    def generation(self, cycle: int) -> List[dict]:
        """What the control plane does when a cycle is acknowledged, then what its verifier does
        in the background: make generation ``cycle`` of every disk, verify each; the final reports."""
        out = []
        for made in self.store.commit_cycle(cycle):
            report = self.store.verify_generation(made["disk"], cycle)
            assert report is not None and report["state"] == "verified", report
            out.append(report)
        return out

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"https://{self.host}:{self.httpd.port}/block/v1/tasks/{self.task}"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
