"""What the log says while the control plane is away: one line when it becomes unreachable, a
summary every ``summary_every_s`` while it stays away, one line when it is back ("reconnected
after X s"). Short interruptions that follow each other (a flapping link: one call fails, the
next succeeds) are folded into those lines instead of logging "unreachable / reconnected" pairs
every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Optional

LOG = logging.getLogger("go2cloud_client.agent")

#: a new outage less than this long after the last reconnect continues the previous one
FLAP_WINDOW_S = 60.0
SUMMARY_EVERY_S = 300.0


class OutageLog:
    def __init__(self, *, summary_every_s: float = SUMMARY_EVERY_S, flap_window_s: float = FLAP_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic,
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.summary_every_s = summary_every_s
        self.flap_window_s = flap_window_s
        self._clock = clock
        self._say = say or (lambda line: None)
        self._lock = threading.Lock()
        self.connected = True
        self._down_since = 0.0  # start of the outage (a flapping series counts as one)
        self._last_summary = 0.0
        self._last_up = -1e18
        self._failures = 0
        self._flaps = 0
        self._announced = False

    @property
    def down_for(self) -> float:
        with self._lock:
            return 0.0 if self.connected else self._clock() - self._down_since

    def failure(self, reason: object) -> List[str]:
        """A call failed because the control plane could not be reached. Returns the lines
        logged (for tests)."""
        out: List[str] = []
        now = self._clock()
        with self._lock:
            self._failures += 1
            if self.connected:
                self.connected = False
                if now - self._last_up < self.flap_window_s and self._announced:
                    self._flaps += 1  # the previous outage goes on: no new line
                    return out
                self._down_since = now
                self._last_summary = now
                self._failures = 1
                self._flaps = 0
                self._announced = True
                out.append(f"control plane unreachable: {reason} (retrying in the background; "
                           "the task keeps running)")
                LOG.warning("%s", out[-1])
                self._say(f"Control plane unreachable ({reason}); retrying in the background")
            elif now - self._last_summary >= self.summary_every_s:
                self._last_summary = now
                flaps = f", {self._flaps} short reconnections" if self._flaps else ""
                out.append(f"control plane still unreachable after {now - self._down_since:.0f}s "
                           f"({self._failures} failed calls{flaps}; last: {reason})")
                LOG.warning("%s", out[-1])
        return out

    def success(self) -> List[str]:
        """A call reached the control plane."""
        out: List[str] = []
        now = self._clock()
        with self._lock:
            if self.connected:
                if self._announced and now - self._last_up >= self.flap_window_s:
                    # stable for a while: the outage (and its short reconnections) is over
                    if self._flaps:
                        out.append(f"control plane reachable again; the connection was unstable for "
                                   f"{self._last_up - self._down_since:.0f}s ({self._flaps} short "
                                   f"interruptions, {self._failures} failed calls)")
                        LOG.info("%s", out[-1])
                    self._announced = False
                    self._flaps = 0
                return out
            self.connected = True
            self._last_up = now
            if self._flaps:
                return out  # a flapping series: the line comes when it has been stable a while
            down = now - self._down_since
            out.append(f"reconnected to the control plane after {down:.0f}s")
            LOG.info("%s", out[-1])
            self._say(f"Reconnected to the control plane after {down:.0f}s")
        return out
