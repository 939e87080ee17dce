"""Supervised loops: the one error policy of the agent's periodic jobs (heartbeat, command
poll, acknowledgements, event flush).

Each job is a function that runs until the stop event is set. The supervisor runs it on its own
thread; if it raises (a bug, a full agent home while writing the command journal, anything) or returns
while the agent is not stopping, the failure is logged (one WARNING line, the traceback at
DEBUG), counted, and the job is started again after a jittered backoff (1 s doubling to 60 s;
a job that then ran for a minute without failing starts the backoff again). :meth:`report` is
what the heartbeat and ``status`` show under ``loops``: per job whether it is alive, its
failures and the last error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from go2cloud_client.backoff import Backoff
from go2cloud_client.clock import utc_now

LOG = logging.getLogger(__name__)

#: a job that ran this long without failing starts its backoff from the beginning again
HEALTHY_AFTER_S = 60.0
DEFAULT_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=60.0, jitter=0.5)


class _Loop:
    def __init__(self, name: str, body: Callable[[], None]) -> None:
        self.name = name
        self.body = body
        self.thread: Optional[threading.Thread] = None
        self.failures = 0
        self.restarts = 0
        self.last_error: Optional[str] = None
        self.last_failure_at: Optional[str] = None
        self.backing_off = False


class LoopSupervisor:
    def __init__(self, stop_event: threading.Event, *, backoff: Backoff = DEFAULT_BACKOFF,
                 on_failure: Optional[Callable[[str, BaseException], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stop_event = stop_event
        self.backoff = backoff
        self.on_failure = on_failure
        self._clock = clock
        self._loops: Dict[str, _Loop] = {}
        self._lock = threading.Lock()

    def spawn(self, name: str, body: Callable[[], None]) -> threading.Thread:
        loop = _Loop(name, body)
        thread = threading.Thread(target=self._supervise, args=(loop,), name=name, daemon=True)
        loop.thread = thread
        with self._lock:
            self._loops[name] = loop
        thread.start()
        return thread

    def threads(self) -> List[threading.Thread]:
        with self._lock:
            return [loop.thread for loop in self._loops.values() if loop.thread is not None]

    def _supervise(self, loop: _Loop) -> None:
        streak = 0
        while not self.stop_event.is_set():
            started = self._clock()
            try:
                loop.body()
                if self.stop_event.is_set():
                    return
                raise RuntimeError("the loop returned while the agent is running")
            except Exception as exc:  # noqa: BLE001 - the policy: log, count, report, restart
                if self.stop_event.is_set():
                    return
                if self._clock() - started >= HEALTHY_AFTER_S:
                    streak = 0
                streak += 1
                delay = self.backoff.delay(streak)
                with self._lock:
                    loop.failures += 1
                    loop.restarts += 1
                    loop.last_error = f"{type(exc).__name__}: {exc}"[:500]
                    loop.last_failure_at = utc_now()
                    loop.backing_off = True
                LOG.warning("the %s loop failed (%s); restarting it in %.0fs (failure %d)",
                            loop.name, loop.last_error, delay, loop.failures)
                LOG.debug("traceback of the %s loop failure", loop.name, exc_info=True)
                if self.on_failure is not None:
                    try:
                        self.on_failure(loop.name, exc)
                    except Exception:  # noqa: BLE001 - reporting must not stop the restart
                        LOG.debug("on_failure of the %s loop failed", loop.name, exc_info=True)
                if self.stop_event.wait(delay):
                    return
                with self._lock:
                    loop.backing_off = False
                LOG.info("the %s loop restarted", loop.name)

    def report(self) -> Dict[str, Any]:
        """``{name: {alive, failures, last_error, last_failure_at}}`` for the heartbeat."""
        with self._lock:
            return {
                name: {
                    "alive": bool(loop.thread and loop.thread.is_alive()) and not loop.backing_off,
                    "failures": loop.failures,
                    "last_error": loop.last_error,
                    "last_failure_at": loop.last_failure_at,
                }
                for name, loop in self._loops.items()
            }
