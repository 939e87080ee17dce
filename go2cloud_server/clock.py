"""The server's clock: one object passed in by the composition root (``go2cloud_server.app``).

``now()`` is the wall clock (epoch seconds, UTC): what is stored, shown and compared with the
agents' clocks (code expiry, offline detection, leases). ``monotonic()`` is for intervals and
timeouts. Production uses :class:`SystemClock`; tests pass a :class:`FakeClock` they move by
hand, and a real server process started for a test can be given an :class:`OffsetClock`
(``serve --clock-offset-s``, a hidden option for tests only). :func:`iso` and :func:`parse_iso`
are the server's one way to write and read a UTC time.
"""

from __future__ import annotations

import datetime
import time
from typing import Optional, Protocol

ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class Clock(Protocol):
    """What the server asks of a clock."""

    def now(self) -> float:
        """Wall-clock epoch seconds (UTC)."""
        ...

    def monotonic(self) -> float:
        """Seconds of a clock that never goes back (intervals, timeouts)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class OffsetClock:
    """The machine's wall clock shifted by ``offset_s`` seconds (tests of code expiry and clock
    skew on a real server process); the monotonic clock is the machine's."""

    def __init__(self, offset_s: float, base: Optional[Clock] = None) -> None:
        self.offset_s = float(offset_s)
        self.base: Clock = base if base is not None else SystemClock()

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()


class FakeClock:
    """A clock that moves only when told (``advance``); both readings move together. Calling it
    returns ``now()`` (for code that takes a plain ``Callable[[], float]``)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = float(start)
        self._mono = 0.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self._mono += seconds

    def __call__(self) -> float:
        return self.t


def iso(epoch: float) -> str:
    """``epoch`` as the server writes times: ``2026-01-02T03:04:05Z``."""
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(ISO_FORMAT)


def parse_iso(text: Optional[str]) -> Optional[float]:
    """The epoch of a time written by :func:`iso` (None if absent or unreadable)."""
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, ISO_FORMAT).replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None


def utc_now_iso() -> str:
    """The machine's current time as :func:`iso` writes it (on-disk reports of the target)."""
    return iso(time.time())
