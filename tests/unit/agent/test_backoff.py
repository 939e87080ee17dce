"""The retry policy of transfers and loops (go2cloud_client/backoff.py): backoff with jitter,
retries bounded by a time budget (not a count), progress restarts the budget."""

from __future__ import annotations

import threading

import pytest

from go2cloud_client import backoff
from go2cloud_client.backoff import Backoff, RetryBudget, jittered


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_to_the_cap_and_jitter_stays_inside_the_ceiling():
    b = Backoff(initial=2, factor=2, cap=60, jitter=0.5)
    assert [b.ceiling(n) for n in (1, 2, 3, 4, 5, 6, 7, 100)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert b.delay(3, rand=lambda: 0.0) == 8  # no jitter drawn: the ceiling
    assert b.delay(3, rand=lambda: 1.0) == 4  # the most jitter: half of it
    assert b.delay(10**6, rand=lambda: 0.0) == 60  # no overflow on very long outages


def test_jitter_spreads_agents_that_failed_together():
    b = Backoff(initial=2, factor=2, cap=60, jitter=0.5)
    import random

    rng = random.Random(7)
    delays = {round(b.delay(4, rand=rng.random), 3) for _ in range(50)}
    assert len(delays) > 40 and all(8 <= d <= 16 for d in delays)
    beats = [jittered(10, 0.1, rand=rng.random) for _ in range(50)]
    assert all(9 <= x <= 11 for x in beats) and len(set(beats)) > 40


@pytest.mark.parametrize("bad", [dict(initial=0), dict(factor=0.5), dict(cap=1, initial=2), dict(jitter=2)])
def test_invalid_backoff_is_refused(bad):
    with pytest.raises(ValueError):
        Backoff(**bad)


def test_budget_is_time_not_a_count():
    clock = Clock()
    budget = RetryBudget(30 * 60, Backoff(initial=2, factor=2, cap=60, jitter=0), clock=clock)
    waits = []
    while True:  # resets every 5 s: as many tries as fit in 30 minutes, far more than 3
        clock.now += 5
        wait = budget.failed()
        if wait is None:
            break
        waits.append(wait)
        clock.now += wait
    assert len(waits) > 25
    assert budget.failing_for >= 30 * 60
    assert waits[:6] == [2, 4, 8, 16, 32, 60] and max(waits) == 60


def test_progress_restarts_budget_and_backoff():
    clock = Clock()
    budget = RetryBudget(100, Backoff(initial=2, factor=2, cap=60, jitter=0), clock=clock)
    for _ in range(4):
        assert budget.failed() is not None
        clock.now += 20
    assert budget.failing_for == 80 and budget.attempts == 4
    budget.progressed()  # the attempt moved data
    assert budget.failing_for == 0
    assert budget.failed() == 2  # the backoff starts again too
    clock.now += 99
    assert budget.failed() is not None
    clock.now += 2
    assert budget.failed() is None  # 101 s of failing since the progress: spent
    assert budget.total_failures == 7


def test_a_cause_with_its_own_budget_and_the_last_wait_never_passes_the_deadline():
    clock = Clock()
    budget = RetryBudget(10, Backoff(initial=8, factor=2, cap=60, jitter=0), clock=clock)
    assert budget.failed() == 8
    clock.now += 8
    assert budget.failed() == 2  # 16 s of backoff cut to the 2 s left of the budget
    clock.now += 2
    assert budget.failed() is None
    assert budget.failed(budget_s=3600) == 60  # the control plane away: the longer budget (capped wait)


# -- request-level retries (tenacity policies) -------------------------------------------------

def test_doubling_waits_are_the_block_transports_table():
    import tenacity

    wait = backoff.doubling(initial=0.5, cap=8.0)
    waits = []
    for n in range(1, 8):
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = n
        waits.append(wait(state))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_retrying_stops_after_the_attempts_and_raises_the_last_error_itself():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        raise OSError(f"try {len(calls)}")

    policy = backoff.retrying(lambda e: isinstance(e, OSError), wait=backoff.doubling(0.5, 8.0),
                              attempts=3, sleep=slept.append)
    with pytest.raises(OSError, match="try 3"):
        policy(flaky)
    assert len(calls) == 3 and slept == [0.5, 1.0]


def test_retrying_does_not_retry_other_errors():
    calls = []

    def permanent():
        calls.append(1)
        raise ValueError("no")

    with pytest.raises(ValueError):
        backoff.retrying(lambda e: isinstance(e, OSError), wait=backoff.NO_WAIT, attempts=5)(permanent)
    assert calls == [1]


def test_interruptible_sleep_raises_once_the_event_is_set_and_stop_event_ends_retries():
    cancel = threading.Event()
    cancel.set()
    sleep = backoff.interruptible_sleep(cancel, lambda: RuntimeError("cancelled while retrying"))
    with pytest.raises(RuntimeError, match="cancelled"):
        sleep(30.0)  # returns at once: the event is set
    calls = []

    def failing():
        calls.append(1)
        raise OSError("down")

    policy = backoff.retrying(lambda e: True, wait=backoff.NO_WAIT, attempts=None, stop_event=cancel)
    with pytest.raises(OSError):
        policy(failing)
    assert calls == [1]
