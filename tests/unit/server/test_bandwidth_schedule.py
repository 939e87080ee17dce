"""The control plane's bandwidth-window validation: normalised form, errors naming the bad part,
and agreement with the agent's parser (the two share the syntax, not code)."""

from __future__ import annotations

import pytest

from go2cloud_client import bwschedule
from go2cloud_server import rules
from go2cloud_server.errors import InvalidInput

CORPUS = [
    "Mon-Fri 08:00-20:00=50,*=0", " sat-sun = 5 ", "22:00-06:00=10", "Fri-Mon 00:00-24:00=1,*=3",
    "Mon 8:00-20:00=5", "Mon 08:00-25:00=5", "Mon 08:00-20:00=x", "Mon=100001", "Mon 08:00=5",
    "Mon 08:00-08:00=5", "*=1,*=2", "Mon 1 2 3=4", "*=1,,Mon=2", "Mon-Tue-Wed=1", "Funday=3",
    "Mon 00:00-24:00=7", "Mon 24:00-01:00=1", "=5", "Mon-Fri 08:00-20:00=50,",
]


@pytest.mark.parametrize("text", CORPUS)
def test_server_and_agent_agree(text: str) -> None:
    try:
        agent = bwschedule.parse(text).text
    except bwschedule.ScheduleError:
        agent = None
    try:
        server = rules.bandwidth_schedule(text)
    except InvalidInput:
        server = None
    assert server == agent


def test_normalised_and_removal() -> None:
    assert rules.bandwidth_schedule(" mon-fri 08:00-20:00 = 50 ,*=0") == "Mon-Fri 08:00-20:00=50,*=0"
    for off in (None, "", "none", "OFF"):
        assert rules.bandwidth_schedule(off) is None


def test_error_names_the_field_and_the_bad_part() -> None:
    with pytest.raises(InvalidInput) as err:
        rules.bandwidth_schedule("Mon-Fri 08:00-20:00=50,Sat 09:00-1x:00=5", "--bandwidth-schedule")
    assert str(err.value.message if hasattr(err.value, "message") else err.value).startswith(
        "--bandwidth-schedule: 'Sat 09:00-1x:00=5': '1x:00' is not a time HH:MM")
