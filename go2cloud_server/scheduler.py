"""Automatic incremental syncs ("sync repeat frequency").

A thread wakes every ``tick_s`` seconds and, for each pending task with an interval, queues a
``sync`` once ``sync_every_s`` seconds have passed since the scheduler saw the task's latest
committed cycle (measured on the injected clock's ``monotonic()``). A server restart therefore
waits one full interval before the first automatic sync: never earlier than asked. Each pass also
queues the cycle of every ``target_full`` task whose target has room again
(``Service.resume_when_room``). Errors are logged and the loop keeps going.

Replicas on one database (PostgreSQL): only the replica that holds the database's ``scheduler``
leadership (``Database.leader``: an advisory lock held by a connection of its own) runs the
passes, so each automatic sync is queued once. The others forget what they saw; one that takes
the leadership over (its leader died) waits a full interval from then, like a restart.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, Optional, Tuple

from go2cloud_server.clock import Clock
from go2cloud_server.errors import ServerError
from go2cloud_server.service import Service

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, service: Service, tick_s: float = 1.0, clock: Optional[Clock] = None) -> None:
        self.service = service
        self.tick_s = tick_s
        #: intervals are measured on ``clock.monotonic()`` (default: the service's clock)
        self.clock: Clock = clock if clock is not None else service.clock
        self._seen: Dict[str, Tuple[Optional[int], float]] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a periodic job owns its errors
                log.warning("scheduler pass failed", exc_info=True)

    def run_once(self) -> int:
        """One pass; returns the number of syncs queued (0 in a replica that is not the leader)."""
        if not self.service.store.leader("scheduler"):
            self._seen.clear()
            return 0
        now = self.clock.monotonic()
        queued = 0
        live = set()
        for task in self.service.auto_sync_candidates():
            tid = task["id"]
            live.add(tid)
            mark = task["last_committed"]
            seen = self._seen.get(tid)
            if seen is None or seen[0] != mark:
                self._seen[tid] = (mark, now)
                continue
            if now - seen[1] < int(task["sync_every_s"]):
                continue
            try:
                self.service.task_action(tid, "sync")
                queued += 1
                log.info("automatic sync queued for task %s", tid)
            except ServerError as exc:
                log.info("automatic sync of %s not queued: %s", tid, exc)
            self._seen[tid] = (mark, now)
        for tid in list(self._seen):
            if tid not in live:
                del self._seen[tid]
        # tasks stopped by a full target resume once there is room again (docs/reliability.md)
        queued += len(self.service.resume_when_room())
        # cycles that failed for a transient cause are queued again after a backoff, bounded
        queued += len(self.service.retry_transient_failures())
        return queued
