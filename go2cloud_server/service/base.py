"""What every concern of the service shares: the facade it belongs to (its store, clock and
configuration), ids, and the task statuses several concerns test."""

from __future__ import annotations

import secrets
import string
from typing import TYPE_CHECKING, Any

from go2cloud_server.clock import Clock, iso
from go2cloud_server.repositories import events as repo_events
from go2cloud_server.repositories.db import Conn
from go2cloud_server.store import Database

if TYPE_CHECKING:
    from go2cloud_server.service import Service

#: ``target_full``: a cycle stopped because the target's storage is full; it resumes by itself
#: when there is room again (the scheduler), or on ``migration sync``
TARGET_FULL = "target_full"
ACTIVE_TASK_STATUSES = ("syncing", "pending", "paused", "failed", TARGET_FULL)
#: statuses of a task before its first sync: the drill runs, passed (start queued) or found a
#: critical item (nothing started until it is fixed and re-run, or overridden)
DRILL_STATUSES = ("drilling", "drill_passed", "drill_abnormal")
#: a source with a task in one of these has a migration (no second task; cancel works)
OPEN_TASK_STATUSES = ACTIVE_TASK_STATUSES + DRILL_STATUSES
#: the commands that carry a sync cycle
CYCLE_COMMANDS = ("start", "sync", "finalize")

_ALNUM_LOWER = string.ascii_lowercase + string.digits


def rand_id(prefix: str, n: int = 16) -> str:
    return prefix + "".join(secrets.choice(_ALNUM_LOWER) for _ in range(n))


def clip(value: Any, n: int) -> str:
    """``value`` cut to ``n`` characters if it is a string, else ``""``."""
    return value[:n] if isinstance(value, str) else ""


class Concern:
    """One concern of the service (workgroups, codes, sources, ...). It reaches the store, the
    clock, the configuration and the other concerns through the facade ``svc``."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    @property
    def store(self) -> Database:
        return self.svc.store

    @property
    def clock(self) -> Clock:
        return self.svc.clock

    def now(self) -> float:
        return self.clock.now()

    def now_iso(self) -> str:
        return iso(self.clock.now())

    def event(self, conn: Conn, source_id: str, level: str, code: str, message: str) -> None:
        """An event of the control plane itself in the source's list (``source show``)."""
        repo_events.add(conn, source_id, self.now_iso(), level, code, message[:2000])
