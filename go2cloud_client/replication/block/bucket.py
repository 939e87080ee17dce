"""Token bucket shared by all senders of a pass: bytes per second from the console's Mbit/s.

``take(n)`` blocks until the bucket is not in debt, then takes ``n`` tokens (the balance may go
negative: a 1 MiB chunk under a 1 Mbit/s limit waits for the time it "costs" before the next one
goes). The burst is 0.25 s worth of the rate (at least 64 KiB), so the long-run rate never exceeds
the limit by more than one burst. ``set_rate`` changes the rate at once, waking the waiters, and
0 means unlimited. Time comes from an injected monotonic clock; waiting uses an injected sleep
(tests pass a fake clock whose sleep advances it) or a condition variable in production.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

BURST_S = 0.25
MIN_BURST = 64 * 1024
MAX_WAIT_S = 0.2  # re-check cancel and rate changes at least this often


def mbps_to_bytes(mbps: int) -> int:
    """Mbit/s -> bytes/s (1 Mbit/s = 125,000 B/s); 0 = unlimited."""
    if mbps < 0:
        raise ValueError("bandwidth_mbps must be >= 0")
    return mbps * 125_000


class TokenBucket:
    def __init__(self, rate_bps: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Optional[Callable[[float], None]] = None) -> None:
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._rate = 0
        self._tokens = 0.0
        self._last = clock()
        self.waited_s = 0.0
        self.set_rate(rate_bps)

    @property
    def rate(self) -> int:
        return self._rate

    def _burst(self) -> float:
        return max(float(MIN_BURST), self._rate * BURST_S)

    def _refill(self, now: float) -> None:
        if self._rate > 0:
            self._tokens = min(self._burst(), self._tokens + (now - self._last) * self._rate)
        self._last = now

    def set_rate(self, rate_bps: int) -> None:
        if rate_bps < 0:
            raise ValueError("rate must be >= 0")
        with self._cond:
            self._refill(self._clock())
            was = self._rate
            self._rate = int(rate_bps)
            if was == 0 and self._rate > 0:
                self._tokens = self._burst()
            elif self._rate > 0:
                self._tokens = min(self._tokens, self._burst())
            self._cond.notify_all()

    def take(self, n: int, cancel: Optional[threading.Event] = None) -> bool:
        """Take ``n`` tokens, waiting as needed. Returns False (nothing taken) if ``cancel`` got
        set while waiting."""
        with self._cond:
            while True:
                if cancel is not None and cancel.is_set():
                    return False
                now = self._clock()
                self._refill(now)
                if self._rate == 0:
                    return True
                if self._tokens > -1.0:  # less than a byte of debt (float rounding)
                    self._tokens -= n
                    return True
                wait = min(MAX_WAIT_S, max(0.001, -self._tokens / self._rate))
                self.waited_s += wait
                if self._sleep is not None:
                    self._cond.release()
                    try:
                        self._sleep(wait)
                    finally:
                        self._cond.acquire()
                else:
                    self._cond.wait(wait)
