"""A TCP fault proxy for the fault tests (docs/reliability.md, section 8).

Real sockets and threads, no mocks: the proxy listens on a loopback address, connects each
accepted connection to the upstream (the real control plane), and forwards bytes both ways.
Being TCP-level, TLS passes through untouched, so an agent pinned to the server's certificate
works through it unchanged. Faults, switchable at any time from the test:

* ``pass``                       forward (optionally throttled: ``throttle(bytes_per_s)``);
* ``reset_all()``                cut every open connection with a TCP RST (``SO_LINGER`` 0);
* ``reset_every(seconds)``       ... and again every N seconds (None stops it);
* ``reset_after_bytes(n)``       cut each connection once it has forwarded N bytes;
* ``stall()`` / ``resume()``     stop forwarding without closing anything (a black hole that
                                  keeps the connections open), then carry on where it stopped;
* ``down()`` / ``up()``          the port refuses connections and open ones are reset (the
                                  control plane is away), then it is back on the same port.

``cut_with_ss()`` is the other way to cut connections: the kernel's ``ss -K`` (socket destroy)
on the proxy's port, as an operator's firewall or a NAT timeout would.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from typing import List, Optional, Set, Tuple

_CHUNK = 16384


class _Bucket:
    """Token bucket shared by every connection of the proxy (bytes per second)."""

    def __init__(self) -> None:
        self.rate: Optional[float] = None
        self._tokens = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                rate = self.rate
                if rate is None:
                    return
                now = time.monotonic()
                self._tokens = min(rate, self._tokens + (now - self._last) * rate)
                self._last = now
                if self._tokens >= n or self._tokens >= rate:
                    self._tokens -= n
                    return
                need = (min(n, rate) - self._tokens) / rate
            stop.wait(min(need, 0.2))


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.forwarded = 0
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        for src, dst, name in ((self.client, self.upstream, "up"), (self.upstream, self.client, "down")):
            threading.Thread(target=self._pump, args=(src, dst), name=f"faultproxy-{name}",
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        proxy = self.proxy
        try:
            while not self.closed.is_set():
                proxy._running.wait()  # stalled: stop reading, keep the connection open
                if self.closed.is_set():
                    return
                try:
                    src.settimeout(0.2)
                    data = src.recv(_CHUNK)
                except socket.timeout:
                    continue
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                proxy._running.wait()  # a stall that began while this chunk was read holds it
                proxy._bucket.take(len(data), self.closed)
                dst.sendall(data)
                with self._lock:
                    self.forwarded += len(data)
                    over = proxy._reset_after is not None and self.forwarded >= proxy._reset_after
                with proxy._lock:
                    proxy.bytes_forwarded += len(data)
                if over:
                    self.reset()
                    return
        except OSError:
            self.reset()

    def reset(self) -> None:
        """Close both sides with a TCP RST."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self.proxy._forget(self)


class FaultProxy:
    """TCP proxy from ``listen`` (host, port; port 0 picks one) to ``upstream``."""

    def __init__(self, upstream: Tuple[str, int], listen: Tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self._listen_addr = listen
        self._listener: Optional[socket.socket] = None
        self._conns: Set[_Conn] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._bucket = _Bucket()
        self._reset_after: Optional[int] = None
        self._reset_every: Optional[float] = None
        self._reset_wakeup = threading.Event()
        self._stop = threading.Event()
        self.connections = 0
        self.resets = 0
        self.bytes_forwarded = 0
        self.host, self.port = listen

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._bind()
        threading.Thread(target=self._resetter, name="faultproxy-resetter", daemon=True).start()
        return self

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._listen_addr[0], self.port))
        sock.listen(128)
        self.host, self.port = sock.getsockname()[:2]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), name="faultproxy-accept", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._reset_wakeup.set()
        self._running.set()
        self._close_listener()
        self.reset_all(count=False)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed (down() or close())
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            conn = _Conn(self, client, upstream)
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- faults ----------------------------------------------------------------------------------
    def passthrough(self) -> None:
        """Forward everything again: no stall, throttle or periodic resets."""
        self.resume()
        self.throttle(None)
        self.reset_every(None)
        self.reset_after_bytes(None)

    def throttle(self, bytes_per_s: Optional[float]) -> None:
        self._bucket.rate = float(bytes_per_s) if bytes_per_s else None

    def reset_all(self, *, count: bool = True) -> int:
        with self._lock:
            conns: List[_Conn] = list(self._conns)
        for conn in conns:
            conn.reset()
        if count:
            self.resets += len(conns)
        return len(conns)

    def reset_every(self, seconds: Optional[float]) -> None:
        self._reset_every = seconds
        self._reset_wakeup.set()

    def reset_after_bytes(self, n: Optional[int]) -> None:
        self._reset_after = n

    def _resetter(self) -> None:
        while not self._stop.is_set():
            period = self._reset_every
            self._reset_wakeup.clear()
            if period is None:
                self._reset_wakeup.wait()
                continue
            if not self._reset_wakeup.wait(period) and self._reset_every is not None:
                self.reset_all()

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open (new ones are accepted and
        stall too)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def stalled(self) -> bool:
        return not self._running.is_set()

    def down(self) -> None:
        """Refuse new connections (the port is closed) and reset the open ones."""
        self._close_listener()
        self.reset_all()

    def up(self) -> None:
        if self._listener is None:
            self._bind()

    def cut_with_ss(self) -> int:
        """Destroy the proxy's client-side sockets with ``ss -K`` (kernel socket destroy).
        Returns how many sockets ss listed as killed; raises if ss cannot do it here."""
        proc = subprocess.run(["ss", "-K", "-t", "-n", "src", self.host, "sport", "=", f":{self.port}"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"ss -K failed ({proc.returncode}): {proc.stderr.strip()}")
        lines = [ln for ln in proc.stdout.splitlines()
                 if ln.strip() and not ln.startswith(("State", "Recv-Q"))]
        return len(lines)
