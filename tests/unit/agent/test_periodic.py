"""Supervised loops (go2cloud_client/periodic.py): a failing loop is logged, restarted with
backoff and reported; it never ends silently."""

from __future__ import annotations

import logging
import threading
import time

from go2cloud_client.backoff import Backoff
from go2cloud_client.errors import HomeFullError
from go2cloud_client.periodic import LoopSupervisor


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_failing_loop_is_restarted_logged_and_reported(caplog):
    stop = threading.Event()
    runs = []
    seen = []
    sup = LoopSupervisor(stop, backoff=Backoff(initial=0.01, factor=1, cap=0.01, jitter=0),
                         on_failure=lambda name, exc: seen.append((name, type(exc).__name__)))

    def body():
        runs.append(1)
        if len(runs) <= 2:
            raise HomeFullError("the agent home /x is full")
        stop.wait()

    with caplog.at_level(logging.WARNING, logger="go2cloud_client.periodic"):
        thread = sup.spawn("acks", body)
        wait_until(lambda: len(runs) == 3)
    report = sup.report()["acks"]
    assert report["failures"] == 2 and report["alive"]
    assert report["last_error"] == "HomeFullError: the agent home /x is full"
    assert seen == [("acks", "HomeFullError"), ("acks", "HomeFullError")]
    assert sum("the acks loop failed" in r.getMessage() for r in caplog.records) == 2
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_a_loop_that_returns_while_running_is_a_failure_too():
    stop = threading.Event()
    runs = []
    sup = LoopSupervisor(stop, backoff=Backoff(initial=0.01, factor=1, cap=0.01, jitter=0))

    def body():
        runs.append(1)
        if len(runs) > 1:
            stop.wait()

    sup.spawn("events", body)
    wait_until(lambda: len(runs) == 2)
    assert sup.report()["events"]["failures"] == 1
    assert "returned" in sup.report()["events"]["last_error"]
    stop.set()


def test_backoff_between_restarts_grows():
    stop = threading.Event()
    times = []
    sup = LoopSupervisor(stop, backoff=Backoff(initial=0.05, factor=2, cap=1, jitter=0))

    def body():
        times.append(time.monotonic())
        raise RuntimeError("boom")

    sup.spawn("heartbeat", body)
    wait_until(lambda: len(times) >= 4)
    stop.set()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2
