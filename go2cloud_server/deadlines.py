"""Total deadlines for what the server waits to receive from a client (slow-client defence).

A socket timeout bounds one ``recv``, not a request: a client that sends a byte every few seconds
would keep a thread (and its TLS state) forever. :class:`Deadlines` owns one thread that shuts a
connection down in both directions when the deadline armed on it passes; the thread reading from
it then sees end of file (or a TLS error), and the handler closes the connection.

A deadline is armed only while the server waits for the client: the request line and headers,
a request body (the TLS handshake has its own total timeout, see httpapi). It is disarmed before
the request is handled, so an answer that takes long on purpose (the long poll of
``GET .../commands?wait=60``) is never cut.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from typing import Callable, List, Optional, Tuple

log = logging.getLogger(__name__)

#: Default total time for a TLS handshake, or for a request line and its headers (seconds).
REQUEST_TIMEOUT_S = 30.0
#: A request body must arrive at this rate at least (bytes/s) on top of the request timeout:
#: well below the lowest bandwidth limit an operator can set (1 Mbit/s).
BODY_MIN_RATE = 16 * 1024


class Deadline:
    """The deadline of one connection; re-armed for each thing awaited. ``expired`` is sticky:
    once the connection was cut, the handler must not act on what it read."""

    __slots__ = ("sock", "what", "at", "generation", "expired", "peer")

    def __init__(self, sock: socket.socket, peer: str = "?") -> None:
        self.sock = sock
        self.peer = peer
        self.what = ""
        self.at = 0.0
        self.generation = 0  # bumped by arm and disarm: stale heap entries are ignored
        self.expired = False


class Deadlines:
    """One watchdog thread for every connection of a server (started at the first :meth:`arm`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cv = threading.Condition()
        self._heap: List[Tuple[float, int, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def arm(self, deadline: Deadline, seconds: float, what: str) -> None:
        """Cut ``deadline.sock`` unless :meth:`disarm` is called within ``seconds``."""
        with self._cv:
            deadline.generation += 1
            deadline.what = what
            deadline.at = self._clock() + seconds
            first = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline.generation, deadline))
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="read-deadlines", daemon=True)
                self._thread.start()
            elif first:
                self._cv.notify()

    def disarm(self, deadline: Deadline) -> None:
        with self._cv:
            deadline.generation += 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                now = self._clock()
                while self._heap and (self._heap[0][0] <= now or self._stale(self._heap[0])):
                    _, _, generation, d = heapq.heappop(self._heap)
                    if generation == d.generation:
                        d.generation += 1
                        d.expired = True
                        self._cut(d)
                self._cv.wait(self._heap[0][0] - now if self._heap else None)

    @staticmethod
    def _stale(entry: Tuple[float, int, int, Deadline]) -> bool:
        return entry[2] != entry[3].generation

    @staticmethod
    def _cut(d: Deadline) -> None:
        log.info("closing the connection of %s: %s not received in time", d.peer, d.what)
        try:
            # socket.socket's own shutdown, also on an SSLSocket (whose shutdown would drop its
            # TLS state under the thread reading from it): the reader gets end of file
            socket.socket.shutdown(d.sock, socket.SHUT_RDWR)
        except OSError:
            pass
