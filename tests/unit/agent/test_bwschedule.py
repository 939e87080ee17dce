"""Bandwidth windows: parsing (errors name the bad part) and evaluation on a fake clock in real
time zones (zoneinfo), across midnight and daylight-saving changes."""

from __future__ import annotations

from datetime import datetime
from typing import List
from zoneinfo import ZoneInfo

import pytest

from go2cloud_client import bwschedule
from go2cloud_client.bwschedule import Evaluator, LocalZone, ScheduleError, parse


class Zone(LocalZone):
    """A named zone from the tz database instead of the host's (fold=0: the first occurrence)."""

    def __init__(self, key: str) -> None:
        self.tz = ZoneInfo(key)

    def wall(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self.tz).replace(tzinfo=None, microsecond=0)

    def timestamp(self, wall: datetime) -> float:
        return wall.replace(tzinfo=self.tz).timestamp()

    def name(self) -> str:
        return str(self.tz)


class Clock:
    def __init__(self, ts: float) -> None:
        self.ts = ts

    def __call__(self) -> float:
        return self.ts


def at(zone: Zone, *args: int) -> float:
    return datetime(*args, tzinfo=zone.tz).timestamp()


def test_parse_normalises_and_evaluates_weekday_windows() -> None:
    s = parse(" mon-FRI 08:00-20:00 = 50 , *=0")
    assert s.text == "Mon-Fri 08:00-20:00=50,*=0"
    # 2024-06-03 is a Monday
    assert s.limit_at(datetime(2024, 6, 3, 7, 59), 9) == 0
    assert s.limit_at(datetime(2024, 6, 3, 8, 0), 9) == 50
    assert s.limit_at(datetime(2024, 6, 7, 19, 59), 9) == 50   # Friday
    assert s.limit_at(datetime(2024, 6, 7, 20, 0), 9) == 0
    assert s.limit_at(datetime(2024, 6, 8, 12, 0), 9) == 0     # Saturday: the default
    # without '*' the task's own limit applies outside the windows
    assert parse("Sat-Sun=5").limit_at(datetime(2024, 6, 5, 12, 0), 9) == 9
    assert parse("Sat-Sun=5").limit_at(datetime(2024, 6, 9, 23, 59), 9) == 5


def test_window_crossing_midnight_belongs_to_its_start_day() -> None:
    s = parse("Fri 22:00-06:00=10,*=100")
    assert s.limit_at(datetime(2024, 6, 7, 21, 59), 0) == 100  # Friday before
    assert s.limit_at(datetime(2024, 6, 7, 23, 0), 0) == 10
    assert s.limit_at(datetime(2024, 6, 8, 5, 59), 0) == 10    # Saturday morning
    assert s.limit_at(datetime(2024, 6, 8, 6, 0), 0) == 100
    assert s.limit_at(datetime(2024, 6, 8, 23, 0), 0) == 100   # Saturday evening: not listed
    assert s.limit_at(datetime(2024, 6, 7, 3, 0), 0) == 100    # Friday morning: Thursday's is not listed
    # a wrapping day range, a window with no days (every day), 24:00 as the end; first entry wins
    s = parse("Sat-Mon 00:00-24:00=1,12:00-13:00=2")
    assert s.text == "Sat-Mon 00:00-24:00=1,Mon-Sun 12:00-13:00=2"
    assert s.limit_at(datetime(2024, 6, 10, 12, 30), 0) == 1  # Monday: the first entry
    assert s.limit_at(datetime(2024, 6, 11, 12, 30), 0) == 2  # Tuesday


@pytest.mark.parametrize("text, part, why", [
    ("Mon-Fri 08:00-20:00=50,Mon-Frx 01:00-02:00=1", "Mon-Frx 01:00-02:00=1", "unknown day 'Frx'"),
    ("Mon 8:00-20:00=5", "Mon 8:00-20:00=5", "'8:00' is not a time HH:MM"),
    ("Mon 08:00-25:00=5", "Mon 08:00-25:00=5", "is not a time of day"),
    ("Mon 08:00-20:00=fast", "Mon 08:00-20:00=fast", "'fast' is not a whole number"),
    ("Mon 08:00-20:00=-5", "Mon 08:00-20:00=-5", "is not a whole number"),
    ("Mon 08:00-20:00=100001", "Mon 08:00-20:00=100001", "above 100000"),
    ("Mon 08:00=5", "Mon 08:00=5", "is not a time range"),
    ("Mon 08:00-08:00=5", "Mon 08:00-08:00=5", "the window is empty"),
    ("Mon 08:00-09:00", "Mon 08:00-09:00", "an entry is WHEN=MBPS"),
    ("*=1,*=2", "*=2", "a second '*'"),
    ("Mon 1 2 3=4", "Mon 1 2 3=4", "expected [DAYS]"),
])
def test_bad_schedules_name_the_bad_part(text: str, part: str, why: str) -> None:
    with pytest.raises(ScheduleError) as err:
        parse(text)
    assert repr(part) in str(err.value) and why in str(err.value)


@pytest.mark.parametrize("text", ["", "  ", "*=1,,Mon=2", "*=1,"])
def test_empty_schedule_or_entry_is_refused(text: str) -> None:
    with pytest.raises(ScheduleError, match="empty"):
        parse(text)


def test_next_change_across_midnight_with_a_fake_clock() -> None:
    zone = Zone("Asia/Tokyo")  # no DST: plain arithmetic
    clock = Clock(at(zone, 2024, 6, 7, 21, 0))  # Friday 21:00
    ev = Evaluator(parse("Fri 22:00-06:00=10,*=0"), 0, zone=zone, clock=clock)
    assert ev.limit_now() == 0
    assert ev.next_change() == (at(zone, 2024, 6, 7, 22, 0), 10)
    assert ev.seconds_to_next_check() == bwschedule.MAX_TIMER_S  # an hour away: re-checked in 5 min
    clock.ts = at(zone, 2024, 6, 7, 21, 58)
    assert ev.seconds_to_next_check() == 120
    clock.ts = at(zone, 2024, 6, 8, 1, 0)
    assert ev.limit_now() == 10
    assert ev.next_change() == (at(zone, 2024, 6, 8, 6, 0), 0)
    clock.ts = at(zone, 2024, 6, 8, 6, 0)
    assert ev.limit_now() == 0
    assert ev.next_change() == (at(zone, 2024, 6, 14, 22, 0), 10)  # a week later
    assert ev.seconds_to_next_check() == bwschedule.MAX_TIMER_S  # the timer still wakes


def test_dst_spring_forward_edge_in_the_gap() -> None:
    """Europe/Berlin 2024-03-31: 02:00 CET jumps to 03:00 CEST. An edge at 02:30 (it does not
    exist that day) falls at 03:30 CEST; the window's end still holds."""
    zone = Zone("Europe/Berlin")
    clock = Clock(at(zone, 2024, 3, 31, 1, 0))
    ev = Evaluator(parse("Sun 02:30-05:00=7,*=0"), 0, zone=zone, clock=clock)
    ts, limit = ev.next_change()  # type: ignore[misc]
    assert limit == 7 and zone.wall(ts) == datetime(2024, 3, 31, 3, 30)
    assert ts - clock.ts == 1.5 * 3600  # 01:00 CET -> 03:30 CEST: 1.5 real hours
    clock.ts = ts
    assert ev.limit_now() == 7
    assert ev.next_change() == (at(zone, 2024, 3, 31, 5, 0), 0)
    # a window wholly inside the gap does not happen that day
    clock.ts = at(zone, 2024, 3, 31, 1, 0)
    ev = Evaluator(parse("Sun 02:10-02:50=7,*=0"), 0, zone=zone, clock=clock)
    ts, _ = ev.next_change()  # type: ignore[misc]
    assert zone.wall(ts).date() == datetime(2024, 4, 7).date()


def test_dst_fall_back_window_follows_the_wall_clock() -> None:
    """Europe/Berlin 2024-10-27: 03:00 CEST falls back to 02:00 CET. A 01:00-04:00 window lasts
    four real hours that night; the edges are where the wall clock says."""
    zone = Zone("Europe/Berlin")
    clock = Clock(at(zone, 2024, 10, 27, 0, 0))
    ev = Evaluator(parse("Sun 01:00-04:00=3,*=0"), 0, zone=zone, clock=clock)
    start, _ = ev.next_change()  # type: ignore[misc]
    clock.ts = start
    end, limit = ev.next_change()  # type: ignore[misc]
    assert limit == 0 and end - start == 4 * 3600
    seen: List[int] = []
    for h in range(0, 4 * 3600, 600):
        clock.ts = start + h
        seen.append(ev.limit_now())
    assert set(seen) == {3}
