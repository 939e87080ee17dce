"""The file-level target without the control plane: the server's real HTTPS listener
(``httpapi.ApiServer``) with its real rsync sessions (``rsyncd.RsyncSessions``), TLS with a
generated certificate, and a small table of tasks in place of the service's database (what the
service's ``rsync_session_spec`` would answer). The agent side under test is the real
``FileReplicator`` with the real tunnel and rsync."""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from go2cloud_server import tls
from go2cloud_server.errors import AuthFailed, Conflict, InvalidInput
from go2cloud_server.httpapi import Api, ApiServer
from go2cloud_server.rsyncd import RsyncSessions, SessionSpec


@dataclass
class TaskEntry:
    password: str
    tree_root: Path
    paths: List[str] = field(default_factory=list)
    cycle: Optional[int] = None
    link_cycle: Optional[int] = None


class Tasks:
    """Stands in for the service: ``rsync_session_spec`` with the same checks."""

    def __init__(self) -> None:
        self.entries: Dict[str, TaskEntry] = {}

    def rsync_session_spec(self, task_id: str, password: str, cycle: int, path: str,
                           epoch: Optional[str] = None) -> SessionSpec:
        """``epoch`` (X-Go2cloud-Epoch) is not checked here: these targets have no sessions
        (fencing is tested against the real service, tests/faults/test_fencing.py)."""
        entry = self.entries.get(task_id)
        if entry is None or not hmac.compare_digest(password.encode(), entry.password.encode()):
            raise AuthFailed("the rsync credentials are not those of an active file task")
        if entry.cycle != cycle:
            raise Conflict(f"task {task_id} is writing cycle {entry.cycle}, not {cycle}")
        if path not in entry.paths:
            raise InvalidInput(f"path {path!r} is not one of the task's paths")
        return SessionSpec(task_id, entry.tree_root, cycle, path, entry.link_cycle,
                           tuple(p for p in entry.paths if p != path), task_id, entry.password)


class RsyncTargetServer:
    def __init__(self, state_dir: Path) -> None:
        cert, key = tls.ensure_certificate(state_dir / "tls", ["127.0.0.1"])
        self.fingerprint = tls.fingerprint(cert)
        self.tasks = Tasks()
        self.sessions = RsyncSessions(state_dir / "sessions")
        api = Api(self.tasks, None, "", rsync_sessions=self.sessions)  # type: ignore[arg-type]
        self.httpd = ApiServer(("127.0.0.1", 0), api, tls.server_context(cert, key))
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)

    def url(self, task_id: str) -> str:
        return f"https://127.0.0.1:{self.httpd.port}/rsync/v1/tasks/{task_id}"

    def start(self) -> RsyncTargetServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.sessions.stop()
        self.httpd.shutdown()
        self.httpd.server_close()
