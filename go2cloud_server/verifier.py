"""The background verifier of block generations: one worker thread, taking turns between tasks.

Acknowledging a block cycle makes the generations at once (a reflink, or a delta of the chunks
that changed: ``blockgens``) and records their artifacts as ``pending``; the sha256 and the
filesystem check of a big image (of a delta: its image composed, checked on a temporary copy)
take minutes, far longer than an HTTP request may. The control plane submits each pending generation
here and the worker verifies them, reporting each result through the callback it was built with.

Fairness: the verifier is shared by every task of the server, and a source decides how large its
disks are (up to what its inventory reported). So the work is done in steps (``verify`` returns a
generator; each ``next`` is one step, e.g. 64 MiB hashed) and the worker takes turns: one step of
the generation in progress of each task that has work, round-robin. A task's generations are
verified one at a time, in submission order; a task with a huge disk slows the others by a share
of the thread, it never makes them wait until it is done. A generation submitted twice while
queued is verified once. The work itself is idempotent (``BlockTaskStore.verify_generation``), so
a generation the server stopped or crashed during is simply submitted again at the next start.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Set, Tuple

log = logging.getLogger(__name__)

#: (task id, cycle, disk)
Job = Tuple[str, int, str]
#: the ``state`` of a block generation's report: made, not yet verified / verified / unreadable
REPORT_PENDING = "pending"
REPORT_VERIFIED = "verified"
REPORT_FAILED = "failed"

#: what ``verify`` returns: None (done at once) or an iterator of steps
Steps = Optional[Iterator[Any]]


class GenerationVerifier:
    """Runs ``verify(task_id, cycle, disk)`` for every submitted generation on one thread, one
    step at a time, round-robin between tasks (see the module's docstring).

    ``start`` is idempotent and also happens on the first ``submit``; ``stop`` lets the running
    step finish (it waits at most ``timeout`` seconds, the thread is a daemon) and drops the
    queue: what was not verified stays pending on disk and in the database, and is submitted
    again when the service starts next. An exception of ``verify`` (or of one of its steps) is
    logged and the worker goes on."""

    def __init__(self, verify: Callable[[str, int, str], Steps], name: str = "generation-verifier") -> None:
        self._verify = verify
        self._name = name
        self._cv = threading.Condition()
        self._jobs: Dict[str, Deque[Job]] = {}  # per task, in submission order
        self._turns: Deque[str] = collections.deque()  # tasks with work, in the order of their turns
        self._active: Dict[str, Tuple[Job, Iterator[Any]]] = {}  # per task: the generation in progress
        self._queued: Set[Job] = set()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._busy = 0

    def start(self) -> None:
        with self._cv:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def submit(self, task_id: str, cycle: int, disk: str) -> None:
        job = (task_id, int(cycle), disk)
        with self._cv:
            if self._stopped or job in self._queued:
                return
            self._queued.add(job)
            self._busy += 1
            if task_id not in self._jobs:
                self._jobs[task_id] = collections.deque()
                self._turns.append(task_id)
            self._jobs[task_id].append(job)
            self._cv.notify()
        self.start()

    def idle(self) -> bool:
        """Nothing queued and nothing running (for tests and status)."""
        with self._cv:
            return self._busy == 0

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the generation verifier is still busy after %.0f s; what it did not finish "
                            "is verified again at the next start", timeout)

    def _next_turn(self) -> Optional[Tuple[str, Optional[Job], Optional[Iterator[Any]]]]:
        """The task whose turn it is, with its generation in progress, or the job to begin;
        None once stopped."""
        with self._cv:
            while not self._stopped and not self._turns:
                self._cv.wait()
            if self._stopped:
                return None
            task_id = self._turns.popleft()
            active = self._active.pop(task_id, None)
            if active is not None:
                return task_id, active[0], active[1]
            job = self._jobs[task_id].popleft()
            self._queued.discard(job)
            return task_id, job, None

    def _run(self) -> None:
        try:
            while True:
                turn = self._next_turn()
                if turn is None:
                    return
                task_id, job, steps = turn
                assert job is not None
                done = True
                try:
                    if steps is None:
                        steps = self._verify(*job)
                    if steps is not None:
                        next(steps)
                        done = False
                except StopIteration:
                    pass
                except Exception as exc:  # noqa: BLE001 - one bad generation must not stop the others
                    log.warning("verifying generation %s of disk %s of task %s failed: %s", job[1], job[2],
                                task_id, exc)
                    log.debug("verification failure", exc_info=True)
                with self._cv:
                    if done:
                        self._busy -= 1
                    else:
                        assert steps is not None
                        self._active[task_id] = (job, steps)
                    if task_id in self._active or self._jobs[task_id]:
                        self._turns.append(task_id)  # its next turn comes after every other task's
                    else:
                        del self._jobs[task_id]
        finally:
            with self._cv:
                active = list(self._active.values())
                self._active.clear()
            for _job, steps in active:  # stopped midway: let each release what it holds
                close = getattr(steps, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:  # noqa: BLE001
                        log.debug("closing an interrupted verification", exc_info=True)
