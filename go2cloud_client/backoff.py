"""The agent's one retry policy module (docs/reliability.md, sections 5-7): backoff with
jitter, retries under a time budget, and the tenacity policies of the request-level retries.

* :class:`Backoff` - the wait before retry ``n``: ``initial * factor**(n-1)``, capped, with a
  random part (``jitter``) so that agents that failed together do not retry together (periodic
  jobs' restarts, cycle retries).
* :class:`RetryBudget` - retries of one operation bounded by *time*, not by a count: a flaky
  network that resets every few seconds gets as many tries as fit in the budget, and an attempt
  that made progress (moved data) starts the budget and the backoff again (a cycle's transfer).
* :func:`retrying` - a tenacity policy for one request retried a bounded number of times (the
  control-plane calls, the block target's requests, a refused chunk sent again), with the waits
  of :func:`doubling` or :func:`random_exponential`, interruptible by an event
  (:func:`interruptible_sleep`, :func:`stop_when_set`).

All waits use the monotonic clock; the clock, the sleep and the random source can be injected
(tests).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import tenacity


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: retry ``n`` (1-based) waits a time drawn uniformly from
    ``[d * (1 - jitter), d]`` where ``d = min(cap, initial * factor ** (n - 1))``."""

    initial: float = 2.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self!r}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry ``attempt`` (no jitter)."""
        n = max(1, attempt)
        # avoid float overflow for very long outages: the cap is reached long before
        return min(self.cap, self.initial * self.factor ** min(n - 1, 64))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        top = self.ceiling(attempt)
        return top * (1.0 - self.jitter * rand())


def jittered(interval: float, fraction: float = 0.1, rand: Callable[[], float] = random.random) -> float:
    """``interval`` spread by +-``fraction`` (periodic jobs: heartbeats of many agents that
    started together drift apart instead of staying bunched)."""
    return max(0.0, interval * (1.0 + fraction * (2.0 * rand() - 1.0)))


class RetryBudget:
    """Retries of one operation under a time budget.

    ``failed()`` after each failed attempt returns how long to wait before the next one, or None
    when the budget is spent (the next attempt would start after ``budget_s`` seconds of failing
    since the first failure, or since the last progress). ``progressed()`` after an attempt that
    moved forward (data sent) starts budget and backoff again. Not thread-safe.
    """

    def __init__(self, budget_s: float, backoff: Backoff = Backoff(), *,
                 clock: Callable[[], float] = time.monotonic,
                 rand: Callable[[], float] = random.random) -> None:
        if budget_s < 0:
            raise ValueError("budget_s must be >= 0")
        self.budget_s = float(budget_s)
        self.backoff = backoff
        self._clock = clock
        self._rand = rand
        self.attempts = 0  #: failed attempts since the budget started
        self.total_failures = 0  #: failed attempts over the whole operation
        self._since: Optional[float] = None

    @property
    def failing_for(self) -> float:
        """Seconds since the first failure of the current run of failures (0 when none)."""
        return 0.0 if self._since is None else self._clock() - self._since

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget_s - self.failing_for)

    def failed(self, budget_s: Optional[float] = None) -> Optional[float]:
        """Record a failed attempt. ``budget_s`` overrides the budget for this failure (a cause
        with a budget of its own: the control plane away, a full disk). Returns the wait before
        the next attempt, or None when the budget is spent."""
        now = self._clock()
        if self._since is None:
            self._since = now
        self.attempts += 1
        self.total_failures += 1
        budget = self.budget_s if budget_s is None else float(budget_s)
        left = budget - (now - self._since)
        if left <= 0:
            return None
        return min(self.backoff.delay(self.attempts, self._rand), left)

    def progressed(self) -> None:
        self.attempts = 0
        self._since = None


# -- request-level retries (tenacity) ----------------------------------------------------------

#: a tenacity wait: seconds to wait after a failed attempt, given the retry state
Wait = Callable[[tenacity.RetryCallState], float]


def doubling(initial: float, cap: float) -> Wait:
    """Waits ``initial, 2*initial, 4*initial...`` up to ``cap``, no jitter (the wait after failed
    attempt ``n`` is ``min(cap, initial * 2**(n-1))``)."""
    return tenacity.wait_exponential(multiplier=initial, max=cap, exp_base=2)


def random_exponential(multiplier: float, cap: float) -> Wait:
    """Full-jitter exponential waits: uniform in ``[0, min(cap, multiplier * 2**n))``."""
    return tenacity.wait_random_exponential(multiplier=multiplier, max=cap)


NO_WAIT: Wait = tenacity.wait_none()


def stop_when_set(event: threading.Event) -> Callable[[tenacity.RetryCallState], bool]:
    """A tenacity stop: no further attempt once ``event`` is set."""
    return lambda _state: event.is_set()


def interruptible_sleep(event: threading.Event,
                        interrupted: Callable[[], BaseException]) -> Callable[[float], None]:
    """A tenacity sleep that waits on ``event`` and raises ``interrupted()`` when it is set
    during the wait (a cancelled transfer stops retrying at once)."""
    def sleep(seconds: float) -> None:
        if event.wait(seconds):
            raise interrupted()
    return sleep


def retrying(retry_on: Callable[[BaseException], bool], *, wait: Wait, attempts: Optional[int],
             stop_event: Optional[threading.Event] = None,
             sleep: Optional[Callable[[float], None]] = None,
             before_sleep: Optional[Callable[[tenacity.RetryCallState], None]] = None) -> tenacity.Retrying:
    """A tenacity policy: exceptions for which ``retry_on`` is true are retried after ``wait``,
    at most ``attempts`` attempts in all (None: no limit) and none once ``stop_event`` is set; the
    last exception is raised as it is (never wrapped in ``tenacity.RetryError``)."""
    stops: List[Any] = []
    if attempts is not None:
        stops.append(tenacity.stop_after_attempt(attempts))
    if stop_event is not None:
        stops.append(stop_when_set(stop_event))
    stop: Any = tenacity.stop_any(*stops) if stops else tenacity.stop_never
    kwargs: Any = {}
    if sleep is not None:
        kwargs["sleep"] = sleep
    if before_sleep is not None:
        kwargs["before_sleep"] = before_sleep
    return tenacity.Retrying(retry=tenacity.retry_if_exception(retry_on), wait=wait, stop=stop,
                             reraise=True, **kwargs)
