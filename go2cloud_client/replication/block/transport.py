"""HTTPS client of the block target (docs/protocol.md, "Block target").

One persistent ``http.client`` connection per thread (kept alive, never shared between threads;
``requests`` cost ~2 ms of agent CPU per 1 MiB chunk on top of the TLS work, docs/performance.md),
the target's certificate pinned by its SHA-256 fingerprint: the TLS context skips CA and hostname
checks (the pin replaces them) and every new connection, re-connections included, compares the
SHA-256 of the peer's certificate with the pin before a byte of a request is sent. Without a pin
the system CAs and the hostname are checked. Through the agent's proxy when one is set for the
target's host (:mod:`go2cloud_client.proxy`: CONNECT, then the same TLS and pin check end to end;
never a proxy read from the environment here). The task token
travels only in the ``Authorization`` header; it is never logged or put in a URL or message.

Retries: connection errors, timeouts and 5xx (but 507) are retried with backoff, interruptibly;
507 -> :class:`BlockTargetFullError`; 401/403/404/4xx -> :class:`BlockTargetRejectedError`;
422 ``chunk_hash_mismatch`` -> :class:`ChunkRefused` (the engine re-reads the chunk and tries again).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import select
import ssl
import struct
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast
from urllib.parse import urlsplit

from go2cloud_client import backoff
from go2cloud_client.proxy import ProxyURL, connect_via_proxy
from go2cloud_client.replication.block.codec import HOLE, Encoded, frame
from go2cloud_client.replication.block.errors import (
    BlockTargetError,
    BlockTargetFullError,
    BlockTargetRejectedError,
    SessionFencedError,
)
from go2cloud_client.tlspin import (
    PinMismatch,
    check_pin,
    client_context,
    is_loopback_host,
    normalize_fingerprint,
)

LOG = logging.getLogger(__name__)

CHUNK_TIMEOUT = (15.0, 120.0)
LONG_TIMEOUT = (15.0, 3600.0)
RETRIES = 5
#: waits between attempts of a request: 0.5, 1, 2, 4, 8 s (no jitter)
BACKOFF = backoff.doubling(initial=0.5, cap=8.0)
VERIFY_RECORD = struct.Struct(">I16s")
VERIFY_BATCH = 65536
MAX_ANSWER = 4 * 1024 * 1024
SMALL_PART = 64 * 1024
_URL_RE = re.compile(r"^/block/v1/tasks/[A-Za-z0-9._-]{1,64}$")


class _Transient(Exception):
    """A failed attempt of a request that another attempt may cure (connection error, timeout,
    TLS error, 5xx but 507); its text says what failed."""


class ChunkRefused(Exception):
    """The target refused a chunk because its data did not match its hash (nothing written)."""


class _Connection(http.client.HTTPSConnection):
    """Keep-alive HTTPS connection whose every (re)connect checks the certificate pin."""

    def __init__(self, host: str, port: Optional[int], context: ssl.SSLContext, pin: Optional[bytes],
                 proxy: Optional[ProxyURL] = None) -> None:
        super().__init__(host, port, timeout=CHUNK_TIMEOUT[0], context=context)
        self._pin = pin
        self.read_timeout = CHUNK_TIMEOUT[1]
        _use_proxy(self, proxy)

    def connect(self) -> None:
        super().connect()  # TCP (connect timeout, TCP_NODELAY) + TLS handshake
        try:
            check_pin(cast(ssl.SSLSocket, self.sock), self._pin)
        except PinMismatch:
            self.close()
            raise
        self.sock.settimeout(self.read_timeout)


class _PlainConnection(http.client.HTTPConnection):
    """Plain http (loopback targets only, see :func:`check_target_url`)."""

    def __init__(self, host: str, port: Optional[int], proxy: Optional[ProxyURL] = None) -> None:
        super().__init__(host, port, timeout=CHUNK_TIMEOUT[0])
        self.read_timeout = CHUNK_TIMEOUT[1]
        _use_proxy(self, proxy)

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


def _use_proxy(conn: http.client.HTTPConnection, proxy: Optional[ProxyURL]) -> None:
    """Make ``conn`` open its TCP connection as a CONNECT tunnel through ``proxy``; TLS (with
    the target's host name) and the pin check then run over it as over a direct connection."""
    if proxy is None:
        return
    host, port = conn.host, conn.port

    def create(address: Any, timeout: Any = None, source_address: Any = None) -> Any:
        return connect_via_proxy(proxy, host, port, CHUNK_TIMEOUT[0] if timeout is None else timeout)

    conn._create_connection = create  # type: ignore[attr-defined]


_Conn = Union[_Connection, _PlainConnection]
Body = Union[bytes, List[bytes]]


def _dropped(conn: _Conn) -> bool:
    """An idle keep-alive connection the server closed (or that has unexpected data): reconnect
    instead of failing a request on it (what urllib3 does before reusing a pooled connection)."""
    sock = conn.sock
    if sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _Response:
    """What :meth:`BlockClient._request` and :func:`_error_of` need of an answer."""

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def check_target_url(url: str) -> str:
    """``https://HOST:PORT/block/v1/tasks/<task>`` (plain http only to a loopback host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"invalid block target URL {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("a block target over plain http is allowed only on a loopback address")
    if not _URL_RE.match(parts.path.rstrip("/")):
        raise ValueError(f"invalid block target URL path {parts.path!r}: expected /block/v1/tasks/<task>")
    return url.rstrip("/")


class BlockClient:
    def __init__(self, url: str, token: str, fingerprint: str, *, cancel: Optional[threading.Event] = None,
                 epoch: int = 0, proxy: Optional[ProxyURL] = None) -> None:
        self.url = check_target_url(url)
        self._token = token
        #: the agent's session epoch (``X-Go2cloud-Epoch``): the target refuses any other
        self.epoch = int(epoch)
        self.fingerprint = normalize_fingerprint(fingerprint) if fingerprint else ""
        self.cancel = cancel or threading.Event()
        self._local = threading.local()
        self._conns: List[_Conn] = []
        self._lock = threading.Lock()
        parts = urlsplit(self.url)
        self.where = parts.netloc
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = parts.path
        self.proxy = proxy
        self._context: Optional[ssl.SSLContext] = None
        self._pin: Optional[bytes] = None
        if self._scheme == "https":
            self._context, self._pin = client_context(self.fingerprint)

    def _connection(self) -> _Conn:
        conn: Optional[_Conn] = getattr(self._local, "conn", None)
        if conn is None:
            if self._context is not None:
                conn = _Connection(self._host, self._port, self._context, self._pin, self.proxy)
            else:
                conn = _PlainConnection(self._host, self._port, self.proxy)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        elif _dropped(conn):
            conn.close()  # the next request reconnects (and checks the pin again)
        return conn

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                c.close()
            self._conns.clear()

    def _exchange(self, method: str, path: str, hdrs: Dict[str, str], body: Body,
                  timeout: Tuple[float, float]) -> _Response:
        conn = self._connection()
        conn.timeout = timeout[0]
        conn.read_timeout = timeout[1]
        if conn.sock is not None:
            conn.sock.settimeout(timeout[1])
        try:
            conn.request(method, self._path + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            content = resp.read(MAX_ANSWER + 1)  # the caller refuses an answer over MAX_ANSWER
            if not resp.isclosed() or resp.will_close:
                conn.close()  # answer not read to its end (too big) or the server closes: reconnect
        except BaseException:
            conn.close()
            raise
        return _Response(resp.status, content)

    def _request(self, method: str, path: str, *, headers: Optional[Dict[str, str]] = None,
                 body: Body = b"", timeout: Tuple[float, float] = CHUNK_TIMEOUT, what: str,
                 ok_404: bool = False, absent: Tuple[int, ...] = ()) -> Optional[Any]:
        """``body``: bytes, or a list of parts sent one after the other (no copy into one buffer)."""
        hdrs = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/octet-stream"}
        if self.epoch:
            hdrs["X-Go2cloud-Epoch"] = str(self.epoch)
        if isinstance(body, list):
            hdrs["Content-Length"] = str(sum(len(part) for part in body))
        hdrs.update(headers or {})
        policy = backoff.retrying(
            lambda exc: isinstance(exc, _Transient), wait=BACKOFF, attempts=RETRIES + 1,
            sleep=backoff.interruptible_sleep(
                self.cancel, lambda: BlockTargetError(f"{what}: cancelled while retrying")))
        try:
            return policy(self._attempt, method, path, hdrs, body, timeout, what, ok_404, absent)
        except _Transient as exc:
            via = f" through the proxy {self.proxy.display}" if self.proxy else ""
            raise BlockTargetError(
                f"{what}: the block target {self.where} failed {RETRIES + 1} times (last: {exc}); "
                f"check that the target is running and reachable{via}") from None

    def _attempt(self, method: str, path: str, hdrs: Dict[str, str], body: Body, timeout: Tuple[float, float],
                 what: str, ok_404: bool, absent: Tuple[int, ...]) -> Optional[Any]:
        """One attempt of :meth:`_request`: the answer, or an error; :class:`_Transient` (its text:
        what failed) when another attempt may succeed."""
        try:
            resp = self._exchange(method, path, hdrs, body, timeout)
        except PinMismatch:
            raise BlockTargetRejectedError(
                f"the certificate of the block target {self.where} does not match the pinned "
                f"fingerprint {self.fingerprint}: the target changed or this is not the task's "
                "target; ask the control plane for the task again") from None
        except ssl.SSLError as exc:
            raise _Transient(f"TLS error: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
            LOG.debug("%s: attempt failed: %s", what, last)
            raise _Transient(last) from None
        if resp.status_code == 200:
            if len(resp.content) > MAX_ANSWER:
                raise BlockTargetError(f"{what}: the target's answer is over {MAX_ANSWER} bytes")
            try:
                return resp.json()
            except ValueError:
                raise BlockTargetError(f"{what}: the target's answer is not JSON") from None
        code, message = _error_of(resp)
        if (resp.status_code == 404 and ok_404) or resp.status_code in absent:
            return None
        if resp.status_code == 507:
            raise BlockTargetFullError(
                f"{what}: the block target {self.where} is out of space ({message}); free space "
                "on the target (or move its data directory), then sync again: the generations "
                "committed before are intact")
        if resp.status_code == 422 and code == "chunk_hash_mismatch":
            raise ChunkRefused(message)
        if resp.status_code == 409 and code == "stale_epoch":
            raise SessionFencedError(
                f"{what}: the block target {self.where} refused this agent's session epoch "
                f"{self.epoch} ({message}); nothing was written. Another agent holds this source "
                "now: if this machine is a clone of the imported one, run go2cloud_client --abort "
                "here and import it again")
        if resp.status_code in (401, 403):
            raise BlockTargetRejectedError(
                f"{what}: the block target {self.where} refused the task token ({code}): the task "
                "was cancelled or its token replaced; the control plane must start it again")
        if 400 <= resp.status_code < 500:
            raise BlockTargetRejectedError(
                f"{what}: the block target {self.where} refused the request with HTTP "
                f"{resp.status_code} {code}: {message}")
        raise _Transient(f"HTTP {resp.status_code} {code}: {message}")

    # -- protocol --------------------------------------------------------------------------------
    def put_chunk(self, disk: str, enc: Encoded, chunk_size: int, disk_size: int) -> None:
        headers = {"X-Chunk-Size": str(chunk_size), "X-Disk-Size": str(disk_size),
                   "X-Encoding": enc.encoding}
        if enc.encoding == HOLE:
            if enc.count > 1:
                headers["X-Chunk-Count"] = str(enc.count)
        else:
            headers["X-Chunk-Xxh3"] = enc.digest.hex()
            if enc.blake3:
                headers["X-Chunk-Blake3"] = enc.blake3
        self._request("PUT", f"/disks/{disk}/chunks/{enc.index}", headers=headers, body=enc.body,
                      what=f"disk {disk} chunk {enc.index}")

    def put_batch(self, disk: str, encs: Sequence[Encoded], chunk_size: int, disk_size: int) -> bool:
        """Send ``encs`` in one request (all or nothing on the target: one refused chunk refuses
        the batch, :class:`ChunkRefused`). False when the target has no batch route (an older
        target: send the chunks one by one)."""
        # chunk bodies go out as they are (no copy of the whole batch); the small parts between
        # them (frame headers, hole frames) are joined so they do not each make a TLS record
        body: List[bytes] = []
        small: List[bytes] = []
        for enc in encs:
            for part in frame(enc):
                if len(part) < SMALL_PART:
                    small.append(part)
                    continue
                if small:
                    body.append(b"".join(small))
                    small = []
                body.append(part)
        if small:
            body.append(b"".join(small))
        # an older target has no such route: 404, or 413 when it sizes the body before routing
        doc = self._request("POST", f"/disks/{disk}/chunks", body=body, absent=(404, 413),
                            headers={"X-Chunk-Size": str(chunk_size), "X-Disk-Size": str(disk_size)},
                            what=f"disk {disk} chunks {encs[0].index}-{encs[-1].index}")
        return doc is not None

    def state(self, disk: str) -> Optional[dict]:
        """What the target committed for ``disk``; None if it has nothing for it."""
        doc = self._request("GET", f"/disks/{disk}", timeout=CHUNK_TIMEOUT, what=f"state of disk {disk}",
                            ok_404=True)
        return doc if isinstance(doc, dict) else None

    def verify(self, disk: str, chunk_size: int, items: Sequence[Tuple[int, bytes]]) -> List[int]:
        """Indices among ``items`` (index, xxh3) whose data on the target differs."""
        differ: List[int] = []
        for start in range(0, len(items), VERIFY_BATCH):
            batch = items[start:start + VERIFY_BATCH]
            body = b"".join(VERIFY_RECORD.pack(i, h) for i, h in batch)
            doc = self._request("POST", f"/disks/{disk}/verify", headers={"X-Chunk-Size": str(chunk_size)},
                                body=body, timeout=LONG_TIMEOUT, what=f"verify of disk {disk}")
            found = doc.get("differ") if isinstance(doc, dict) else None
            if not isinstance(found, list) or not all(isinstance(i, int) for i in found):
                raise BlockTargetError(f"verify of disk {disk}: malformed answer from the target")
            differ.extend(found)
        return sorted(set(differ))

    def commit(self, disk: str, cycle: int, disk_size: int, chunk_size: int, hashes: bytes) -> dict:
        doc = self._request("POST", f"/disks/{disk}/commit", body=hashes, timeout=LONG_TIMEOUT,
                            headers={"X-Cycle": str(cycle), "X-Disk-Size": str(disk_size),
                                     "X-Chunk-Size": str(chunk_size)},
                            what=f"commit of disk {disk}")
        return doc if isinstance(doc, dict) else {}


def _error_of(resp: Any) -> Tuple[str, str]:
    try:
        err = resp.json().get("error", {})
        return str(err.get("code", "")), str(err.get("message", ""))[:300]
    except (ValueError, AttributeError):
        return "", (resp.text or "")[:200]
