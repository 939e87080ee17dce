"""Bandwidth windows: a limit per time of the week, in the source's local time.

Syntax (the control plane sends the operator's string, normalised; the agent parses it again and
refuses a bad one)::

    SCHEDULE := ENTRY ("," ENTRY)*
    ENTRY    := [DAYS " "] HH:MM "-" HH:MM "=" MBPS     a window (end may be 24:00)
              | DAYS "=" MBPS                          whole days
              | "*=" MBPS                              everything no window covers
    DAYS     := DAY | DAY "-" DAY                       Mon Tue Wed Thu Fri Sat Sun; Fri-Mon wraps

``MBPS`` is Mbit/s, 0 = unlimited. A window whose end is before its start crosses midnight and
belongs to the day it starts on (``Fri 22:00-06:00`` runs from Friday 22:00 to Saturday 06:00).
The first entry that covers a moment wins; with no ``*`` the task's own bandwidth limit applies
outside the windows. Times are wall-clock times of the source's time zone: on a daylight-saving
change an edge at a time that does not exist that day (02:30 in spring) falls where the clock would
be had it not jumped (03:30), a window wholly inside the gap does not happen that day, and in the
repeated autumn hour the wall clock (and so any window in it) runs twice; the timer also
re-evaluates every 5 minutes, so a change there applies within 5 minutes at the latest.

:class:`LocalZone` converts between POSIX time and the local wall clock (``time.localtime`` /
``time.mktime``, which follow the host's ``/etc/localtime`` or ``TZ``); tests pass a zone built on
:mod:`zoneinfo` and a fake clock.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, FrozenSet, List, Optional, Tuple

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MAX_MBPS = 100000
MAX_ENTRIES = 32
MAX_LEN = 1024
#: the timer re-evaluates at least this often (a clock step, a zone change, a missed edge)
MAX_TIMER_S = 300.0

_TIME = re.compile(r"^(\d{2}):(\d{2})$")


class ScheduleError(ValueError):
    """A schedule that does not parse; the message names the bad part."""


@dataclass(frozen=True)
class Window:
    days: FrozenSet[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight, 1-1440; end <= start: crosses midnight
    mbps: int

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # crosses midnight: the evening of a listed day or the morning after one
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


@dataclass(frozen=True)
class Schedule:
    windows: Tuple[Window, ...]
    default: Optional[int]  # the ``*`` entry; None: the task's bandwidth limit
    text: str  # normalised

    def limit_at(self, wall: datetime, fallback: int) -> int:
        """The limit (Mbit/s, 0 = unlimited) at a local wall-clock time."""
        minute = wall.hour * 60 + wall.minute
        for w in self.windows:
            if w.covers(wall.weekday(), minute):
                return w.mbps
        return fallback if self.default is None else self.default

    def edges_after(self, wall: datetime) -> List[datetime]:
        """Wall-clock times (naive) after ``wall`` within the next 8 days where a window starts
        or ends, sorted."""
        base = wall.replace(hour=0, minute=0, second=0, microsecond=0)
        out = set()
        for day in range(-1, 9):
            d = base + timedelta(days=day)
            for w in self.windows:
                for m in (w.start, w.end % 1440):
                    t = d + timedelta(minutes=m)
                    if t > wall:
                        out.add(t)
        return sorted(out)


def _day(text: str, part: str) -> int:
    for i, name in enumerate(DAYS):
        if text.lower() == name.lower():
            return i
    raise ScheduleError(f"{part!r}: unknown day {text!r} (use Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _days(text: str, part: str) -> FrozenSet[int]:
    if "-" in text:
        a, _, b = text.partition("-")
        first, last = _day(a, part), _day(b, part)
        return frozenset((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset({_day(text, part)})


def _minutes(text: str, part: str, *, end: bool) -> int:
    m = _TIME.match(text)
    if not m:
        raise ScheduleError(f"{part!r}: {text!r} is not a time HH:MM")
    h, mi = int(m.group(1)), int(m.group(2))
    if (h, mi) == (24, 0) and end:
        return 1440
    if h > 23 or mi > 59:
        raise ScheduleError(f"{part!r}: {text!r} is not a time of day (00:00-23:59; 24:00 as an end)")
    return h * 60 + mi


def _mbps(text: str, part: str) -> int:
    if not text.isdigit():
        raise ScheduleError(f"{part!r}: the limit {text!r} is not a whole number of Mbit/s")
    value = int(text)
    if value > MAX_MBPS:
        raise ScheduleError(f"{part!r}: the limit {value} is above {MAX_MBPS} Mbit/s")
    return value


def _fmt_days(spec: str) -> str:
    return "-".join(DAYS[_day(p, spec)] for p in spec.split("-"))


def parse(text: str) -> Schedule:
    """Parse a schedule; raises :class:`ScheduleError` naming the bad part."""
    if not isinstance(text, str):
        raise ScheduleError("the schedule must be a string")
    if len(text) > MAX_LEN:
        raise ScheduleError(f"the schedule is longer than {MAX_LEN} characters")
    parts = [p.strip() for p in text.split(",")]
    if not text.strip():
        raise ScheduleError("the schedule is empty (give e.g. \"Mon-Fri 08:00-20:00=50,*=0\")")
    if len(parts) > MAX_ENTRIES:
        raise ScheduleError(f"the schedule has more than {MAX_ENTRIES} entries")
    windows: List[Window] = []
    default: Optional[int] = None
    norm: List[str] = []
    for part in parts:
        if not part:
            raise ScheduleError("an entry is empty (two commas, or a comma at an end)")
        if part.count("=") != 1:
            raise ScheduleError(f"{part!r}: an entry is WHEN=MBPS (e.g. Mon-Fri 08:00-20:00=50 or *=0)")
        when, _, value = (s.strip() for s in part.partition("="))
        mbps = _mbps(value, part)
        if when == "*":
            if default is not None:
                raise ScheduleError(f"{part!r}: a second '*' entry (give the default once)")
            default = mbps
            norm.append(f"*={mbps}")
            continue
        fields = when.split()
        if len(fields) == 2:
            day_spec, span = fields
        elif len(fields) == 1 and any(c.isdigit() for c in fields[0]):
            day_spec, span = "Mon-Sun", fields[0]
        elif len(fields) == 1:
            day_spec, span = fields[0], "00:00-24:00"
        else:
            raise ScheduleError(f"{part!r}: expected [DAYS] HH:MM-HH:MM=MBPS, DAYS=MBPS or *=MBPS")
        days = _days(day_spec, part)
        a, sep, b = span.partition("-")
        if not sep:
            raise ScheduleError(f"{part!r}: {span!r} is not a time range HH:MM-HH:MM")
        start, end = _minutes(a, part, end=False), _minutes(b, part, end=True)
        if start == end % 1440 and end != 1440:
            raise ScheduleError(f"{part!r}: the window is empty (start and end are both {a})")
        windows.append(Window(days, start, end, mbps))
        norm.append(f"{_fmt_days(day_spec)} {span}={mbps}")
    return Schedule(tuple(windows), default, ",".join(norm))


class LocalZone:
    """The host's time zone: POSIX time <-> naive local wall clock."""

    def wall(self, ts: float) -> datetime:
        return datetime(*time.localtime(ts)[:6])

    def timestamp(self, wall: datetime) -> float:
        # tm_isdst=-1: the C library decides; a time in the spring gap moves past the gap
        return time.mktime((wall.year, wall.month, wall.day, wall.hour, wall.minute, wall.second,
                            0, 0, -1))

    def name(self) -> str:
        return time.strftime("%Z")


class Evaluator:
    """A schedule evaluated on a clock in a zone: the limit now and when it may change next."""

    def __init__(self, schedule: Schedule, fallback: int, *, zone: Optional[LocalZone] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.schedule = schedule
        self.fallback = fallback
        self.zone = zone or LocalZone()
        self.clock = clock

    def limit_now(self) -> int:
        return self.schedule.limit_at(self.zone.wall(self.clock()), self.fallback)

    def next_change(self) -> Optional[Tuple[float, int]]:
        """(POSIX time, new limit) of the next edge where the limit changes within 8 days,
        or None when it does not change."""
        now = self.clock()
        current = self.limit_now()
        for wall in self.schedule.edges_after(self.zone.wall(now)):
            ts = self.zone.timestamp(wall)
            if ts <= now:
                continue
            limit = self.schedule.limit_at(self.zone.wall(ts), self.fallback)
            if limit != current:
                return ts, limit
        return None

    def seconds_to_next_check(self) -> float:
        nxt = self.next_change()
        delay = MAX_TIMER_S if nxt is None else nxt[0] - self.clock()
        return max(0.05, min(MAX_TIMER_S, delay))
