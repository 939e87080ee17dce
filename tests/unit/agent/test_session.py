"""open_session waits while another process holds the session (go2cloud_client/session.py)."""

from __future__ import annotations

import threading

import pytest

from go2cloud_client import session
from go2cloud_client.errors import SessionBusyError, SessionConflictError


class Busy:
    """open_call: session_busy ``times`` times, then the epoch."""

    def __init__(self, times: int, retry_after: float = 1.0, epoch: int = 7) -> None:
        self.left, self.retry_after, self.epoch = times, retry_after, epoch
        self.calls = 0

    def __call__(self, sid, instance, fp) -> int:
        self.calls += 1
        if self.left:
            self.left -= 1
            raise SessionBusyError("session_busy: held by another process", retry_after=self.retry_after)
        return self.epoch


def test_waits_while_busy_then_returns_the_epoch_and_tells_once(home):
    told = []
    call = Busy(times=1)
    assert session.open_session(call, home, stop_event=threading.Event(), on_wait=told.append) == 7
    assert call.calls == 2 and len(told) == 1


def test_stopping_while_waiting_returns_no_session(home):
    stop = threading.Event()
    stop.set()
    told = []
    call = Busy(times=5)
    assert session.open_session(call, home, stop_event=stop, on_wait=told.append) == 0
    assert call.calls == 1 and len(told) == 1


def test_a_conflict_is_raised_at_once(home):
    calls = []

    def conflict(sid, instance, fp):
        calls.append(1)
        raise SessionConflictError("another live agent holds this source")

    with pytest.raises(SessionConflictError):
        session.open_session(conflict, home, stop_event=threading.Event())
    assert calls == [1]


@pytest.mark.parametrize(("retry_after", "wait"), [(None, 5.0), (0.2, 1.0), (30, 30.0), (3600, 60.0)])
def test_the_wait_follows_retry_after_between_1_s_and_max_wait(retry_after, wait):
    import tenacity

    state = tenacity.RetryCallState(None, None, (), {})
    state.set_exception((SessionBusyError, SessionBusyError("busy", retry_after=retry_after), None))
    assert session._busy_wait(state) == wait
