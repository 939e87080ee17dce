"""The background verifier of block generations: one worker thread, a queue.

Acknowledging a block cycle makes the generation images at once (a reflink, or a sparse copy) and
records their artifacts as ``pending``; the sha256 and the filesystem check of a big image take
minutes, far longer than an HTTP request may. The control plane submits each pending generation
here; the worker verifies them one at a time, in submission order, and reports each result
through the callback it was built with. A generation submitted twice while queued is verified
once. The work itself is idempotent (``BlockTaskStore.verify_generation``), so a generation the
server stopped or crashed during is simply submitted again at the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional, Set, Tuple

log = logging.getLogger(__name__)

#: (task id, cycle, disk)
Job = Tuple[str, int, str]
#: the ``state`` of a block generation's report: made, not yet verified / verified / unreadable
REPORT_PENDING = "pending"
REPORT_VERIFIED = "verified"
REPORT_FAILED = "failed"


class GenerationVerifier:
    """Runs ``verify(task_id, cycle, disk)`` for every submitted generation on one thread.

    ``start`` is idempotent and also happens on the first ``submit``; ``stop`` lets the running
    job finish (it waits at most ``timeout`` seconds, the thread is a daemon) and drops the queue:
    what was not verified stays pending on disk and in the database, and is submitted again when
    the service starts next. An exception of ``verify`` is logged and the worker goes on."""

    def __init__(self, verify: Callable[[str, int, str], None], name: str = "generation-verifier") -> None:
        self._verify = verify
        self._name = name
        self._queue: queue.Queue[Optional[Job]] = queue.Queue()
        self._queued: Set[Job] = set()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._busy = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def submit(self, task_id: str, cycle: int, disk: str) -> None:
        job = (task_id, int(cycle), disk)
        with self._lock:
            if self._stopped or job in self._queued:
                return
            self._queued.add(job)
            self._busy += 1
        self._queue.put(job)
        self.start()

    def idle(self) -> bool:
        """Nothing queued and nothing running (for tests and status)."""
        with self._lock:
            return self._busy == 0

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._queue.put(None)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the generation verifier is still busy after %.0f s; what it did not finish "
                            "is verified again at the next start", timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._queued.discard(job)
                stopped = self._stopped
            try:
                if not stopped:
                    self._verify(*job)
            except Exception as exc:  # noqa: BLE001 - one bad generation must not stop the others
                task_id, cycle, disk = job
                log.warning("verifying generation %s of disk %s of task %s failed: %s", cycle, disk, task_id,
                            exc)
                log.debug("verification failure", exc_info=True)
            finally:
                with self._lock:
                    self._busy -= 1
