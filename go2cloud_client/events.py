"""Bounded buffer of events for the control plane (docs/protocol.md, Events).

Up to ``capacity`` events are kept while the control plane is unreachable; beyond that the
oldest are dropped and the next flush starts with an event saying how many were lost.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, Dict

from go2cloud_client.clock import utc_now

BATCH = 100


class EventBuffer:
    def __init__(self, capacity: int = 1000) -> None:
        self._events: Deque[Dict[str, Any]] = deque(maxlen=capacity)
        self._dropped = 0
        self._lock = threading.Lock()

    def add(self, level: str, code: str, message: str) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self._dropped += 1
            self._events.append({"time": utc_now(), "level": level, "code": code, "message": message[:2000]})

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def flush(self, send: Callable[[Any], None]) -> int:
        """Send buffered events in batches of 100 with ``send``; stops at the first failure
        (which propagates) keeping the unsent events. Returns how many were sent."""
        sent = 0
        while True:
            with self._lock:
                if self._dropped:
                    self._events.appendleft({
                        "time": utc_now(), "level": "warning", "code": "events_dropped",
                        "message": f"{self._dropped} older events were dropped while the control plane "
                                   "was unreachable"})
                    self._dropped = 0
                batch = list(self._events)[:BATCH]
            if not batch:
                return sent
            send(batch)
            with self._lock:
                for _ in range(len(batch)):
                    if self._events:
                        self._events.popleft()
            sent += len(batch)
