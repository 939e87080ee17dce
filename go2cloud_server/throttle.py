"""Throttling of activation-code checks (``POST /api/v1/sources/import``).

Two guards, both in front of the slow part of an import (scrypt, deliberately 16 MiB and tens of
milliseconds per check):

* :class:`ImportThrottle` counts failed imports (wrong code, unknown token id) per **token id**
  and per **client address** in a sliding window (:class:`FailureWindow`). Over a limit, the
  import is answered ``429 rate_limited`` with ``Retry-After`` (seconds until the oldest counted
  failure leaves the window) before the code is looked at. Successful imports count nothing, so
  an import with another token id from another address is never blocked by someone's failures.
* :class:`KeyDerivation` runs every scrypt on a fixed pool of ``workers`` threads with at most
  ``queue`` more waiting; beyond that (or after ``wait_s``) the import is answered ``503
  server_busy`` with ``Retry-After``. This bounds the work and the memory of parallel attempts,
  which the failure counts alone do not (they count an attempt once it failed): a dedicated
  thread reuses its own malloc arena, whereas derivations spread over request threads leave
  16 MiB in each thread's arena.

Unknown token ids are derived against a dummy salt and digest (:meth:`KeyDerivation.check`), so a
known and an unknown token id answer in the same time.
"""

from __future__ import annotations

import collections
import hmac
import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Deque, Optional

from go2cloud_server.errors import Busy, Throttled
from go2cloud_server.rules import IMPORT_FAILURES_PER_ADDRESS, IMPORT_WINDOW_S

log = logging.getLogger(__name__)

# IMPORT_WINDOW_S (the sliding window of failed imports, seconds) and IMPORT_FAILURES_PER_ADDRESS
# (failed imports from one client address in the window; the next ones get 429) are defined in
# rules: ``serve --help`` shows them without importing this module
#: failed imports naming one token id in the window (from any address); the next ones get 429
IMPORT_FAILURES_PER_TOKEN = 2 * IMPORT_FAILURES_PER_ADDRESS
#: keys remembered at most per table (oldest dropped first): memory stays bounded under a flood
#: of made-up token ids
MAX_TRACKED_KEYS = 20000
#: threads deriving keys (scrypt, 16 MiB each)
KDF_WORKERS = 2
#: derivations waiting for a worker at most; more are answered 503 at once
KDF_QUEUE = 64
#: longest a request waits for its derivation before it is answered 503
KDF_WAIT_S = 10.0
#: ``Retry-After`` of a 503 server_busy
BUSY_RETRY_AFTER_S = 2


class FailureWindow:
    """Failures per key in a sliding window of ``window_s`` seconds (``clock`` is monotonic)."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED_KEYS,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._hits: collections.OrderedDict[str, Deque[float]] = collections.OrderedDict()

    def _live(self, key: str, now: float) -> Optional[Deque[float]]:
        hits = self._hits.get(key)
        if hits is None:
            return None
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if not hits:
            del self._hits[key]
            return None
        return hits

    def retry_after(self, key: str) -> float:
        """0 when ``key`` may try again now, else the seconds until it may."""
        now = self._clock()
        hits = self._live(key, now)
        if hits is None or len(hits) < self.limit:
            return 0.0
        return max(0.0, hits[len(hits) - self.limit] + self.window_s - now)

    def add(self, key: str) -> None:
        """Count one failure of ``key``."""
        now = self._clock()
        hits = self._live(key, now)
        if hits is None:
            hits = self._hits[key] = collections.deque()
            while len(self._hits) > self._max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        hits.append(now)
        while len(hits) > self.limit:  # older hits no longer change the answer
            hits.popleft()


class ImportThrottle:
    """The failed-import limits of one server, per token id and per client address."""

    def __init__(
        self,
        *,
        window_s: float = IMPORT_WINDOW_S,
        per_address: int = IMPORT_FAILURES_PER_ADDRESS,
        per_token: int = IMPORT_FAILURES_PER_TOKEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self.by_address = FailureWindow(per_address, window_s, clock=clock)
        self.by_token = FailureWindow(per_token, window_s, clock=clock)

    def check(self, token_id: str, address: str) -> None:
        """Raise :class:`Throttled` (429) when the address or the token id is over its limit."""
        with self._lock:
            wait = max(self.by_address.retry_after(address), self.by_token.retry_after(token_id))
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            log.warning(
                "import from %s with token id %s throttled (too many failed attempts); retry in %d s",
                address or "?",
                ascii(token_id[:64]),
                seconds,
            )
            raise Throttled(
                f"too many failed imports from this address or with this activation code: wait "
                f"{seconds} s, then check the token id and token code and try again",
                retry_after=seconds,
            )

    def failed(self, token_id: str, address: str) -> None:
        """Count a failed import (a wrong code or an unknown token id)."""
        with self._lock:
            self.by_address.add(address)
            self.by_token.add(token_id)


class KeyDerivation:
    """Activation-code digests computed on ``workers`` dedicated threads, ``queue`` more waiting."""

    def __init__(
        self,
        derive: Callable[[str, bytes], bytes],
        *,
        workers: int = KDF_WORKERS,
        queue: int = KDF_QUEUE,
        wait_s: float = KDF_WAIT_S,
    ) -> None:
        self._derive = derive
        self.workers = workers
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._wait_s = wait_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdf")
        self._lock = threading.Lock()
        self.running = 0
        #: the most derivations that ever ran at once (never above ``workers``)
        self.peak = 0
        self._dummy_salt = os.urandom(16)
        self._dummy_digest = os.urandom(32)

    def _run(self, code: str, salt: bytes) -> bytes:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._derive(code, salt)
        finally:
            with self._lock:
                self.running -= 1

    def digest(self, code: str, salt: bytes) -> bytes:
        """The digest of ``code`` with ``salt``; :class:`Busy` (503) when the pool is full."""
        if not self._slots.acquire(blocking=False):
            log.warning("activation-code check refused: %d derivations running or waiting", self.workers)
            raise Busy(
                "the server is busy checking other activation codes: retry in a few seconds",
                retry_after=BUSY_RETRY_AFTER_S,
            )
        try:
            future: Future[bytes] = self._pool.submit(self._run, code, salt)
            try:
                return future.result(timeout=self._wait_s)
            except FutureTimeout:
                future.cancel()
                raise Busy(
                    "the server is busy checking other activation codes: retry in a few seconds",
                    retry_after=BUSY_RETRY_AFTER_S,
                ) from None
        finally:
            self._slots.release()

    def check(self, code: str, salt: Optional[bytes], expected: Optional[bytes]) -> bool:
        """Whether ``code`` matches ``expected`` (constant-time). ``salt``/``expected`` None (an
        unknown token id) derives against a dummy salt and digest: the same work, always False."""
        if salt is None or expected is None:
            hmac.compare_digest(self.digest(code, self._dummy_salt), self._dummy_digest)
            return False
        return hmac.compare_digest(self.digest(code, salt), expected)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
