"""Backoff with jitter and retries under a time budget: the one retry policy of the agent's
transfers and periodic jobs (docs/reliability.md, sections 5-7).

* :class:`Backoff` - the wait before retry ``n``: ``initial * factor**(n-1)``, capped, with a
  random part (``jitter``) so that agents that failed together do not retry together.
* :class:`RetryBudget` - retries of one operation bounded by *time*, not by a count: a flaky
  network that resets every few seconds gets as many tries as fit in the budget, and an attempt
  that made progress (moved data) starts the budget and the backoff again.

Both use the monotonic clock; the clock and the random source can be injected (tests).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional


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
