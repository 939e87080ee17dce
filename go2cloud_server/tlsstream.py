"""TLS done in memory for the agents' rsync sessions (the other connections use ``ssl.SSLSocket``).

An agent's rsync session is a long stream in both directions at once. Through an
``ssl.SSLSocket`` it costs one 16 KiB record per call, each with its own system calls, and the
socket may not be read by one thread while another writes. :class:`TLSConnection` keeps the TLS
state in an ``ssl.SSLObject`` over two ``ssl.MemoryBIO`` and moves the encrypted bytes with
plain socket calls of up to 256 KiB: one thread may receive while another sends (the TLS state
is only touched under a lock), and a call moves as many records as have arrived.

The agent's tunnel announces ``go2cloud-rsync`` in its TLS ClientHello (ALPN);
:func:`peek_alpn` reads that offer without consuming a byte, so the listener can choose the
connection's kind before the handshake. The connection still speaks HTTP first (the upgrade
request, checked as every request is): it offers the socket calls ``http.server`` uses.
"""

from __future__ import annotations

import io
import socket
import ssl
import struct
import threading
import time
from typing import Any, List, Optional

BUFFER = 256 * 1024
#: the ALPN protocol of the agents' rsync sessions
RSYNC_ALPN = b"go2cloud-rsync"
MAX_HELLO = 16 * 1024 + 5


def client_hello_alpn(data: bytes) -> Optional[List[bytes]]:
    """The ALPN protocols a TLS ClientHello offers ([] when it offers none), or None when
    ``data`` does not hold one whole ClientHello record (yet)."""
    try:
        if len(data) < 5 or data[0] != 0x16:
            return None
        (record_len,) = struct.unpack_from(">H", data, 3)
        if len(data) < 5 + record_len:
            return None
        body = data[5:5 + record_len]
        if body[0] != 0x01:
            return None
        hello_len = int.from_bytes(body[1:4], "big")
        if hello_len + 4 > len(body):
            return None  # a ClientHello spread over several records: not ours
        pos = 4 + 2 + 32  # type and length, client version, random
        pos += 1 + body[pos]  # session id
        (n,) = struct.unpack_from(">H", body, pos)
        pos += 2 + n  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos >= 4 + hello_len:
            return []
        (ext_total,) = struct.unpack_from(">H", body, pos)
        pos += 2
        end = min(pos + ext_total, 4 + hello_len)
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from(">HH", body, pos)
            pos += 4
            if ext_type == 0x0010:  # application_layer_protocol_negotiation
                (list_len,) = struct.unpack_from(">H", body, pos)
                protos, p, stop = [], pos + 2, pos + 2 + list_len
                while p < stop:
                    size = body[p]
                    protos.append(bytes(body[p + 1:p + 1 + size]))
                    p += 1 + size
                return protos
            pos += ext_len
        return []
    except (IndexError, struct.error):
        return None


def peek_alpn(sock: socket.socket, timeout: float) -> Optional[List[bytes]]:
    """The ALPN offer of the ClientHello waiting on ``sock``, read with MSG_PEEK (nothing is
    consumed); None if no whole ClientHello arrived within ``timeout`` seconds or it is not TLS."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
        except OSError:
            return None
        if not data:
            return None
        offer = client_hello_alpn(data)
        if offer is not None or len(data) >= MAX_HELLO or data[0] != 0x16:
            return offer
        time.sleep(0.005)  # the rest of the ClientHello is on its way (peeking does not wait for it)


class _Reader(io.RawIOBase):
    def __init__(self, conn: TLSConnection) -> None:
        self._conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        return self._conn.recv_into(buf)


class TLSConnection:
    """The server's end of a TLS connection with the TLS state in memory (see the module)."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.raw = sock
        self._tls = tls
        self._in = incoming
        self._out = outgoing
        self._tls_lock = threading.Lock()  # the SSLObject and its two BIOs
        self._send_lock = threading.Lock()  # the order of encrypted bytes on the wire
        self._eof = False
        self._wire = bytearray(BUFFER)  # encrypted bytes as received (one reader at a time)
        self._wire_view = memoryview(self._wire)

    @classmethod
    def accept(cls, sock: socket.socket, ctx: ssl.SSLContext, timeout: float) -> TLSConnection:
        """The server's handshake on ``sock``, within ``timeout`` seconds in total."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        conn = cls(sock, ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                conn._flush()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("the TLS handshake took too long") from None
                sock.settimeout(left)
                data = sock.recv(BUFFER)
                if not data:
                    raise ConnectionResetError("the client closed the connection during the TLS "
                                               "handshake") from None
                incoming.write(data)
        conn._flush()
        return conn

    def _flush(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                wire = self._out.read()
            if wire:
                self.raw.sendall(wire)

    # -- the stream -------------------------------------------------------------------------------
    def sendall(self, data: Any) -> None:
        with self._send_lock:
            with self._tls_lock:
                view = memoryview(data)
                while view:
                    n = self._tls.write(view)
                    view = view[n:]
                wire = self._out.read()
            self.raw.sendall(wire)

    def send(self, data: Any) -> int:
        self.sendall(data)
        return len(data)

    def recv_some(self) -> bytes:
        """The next plaintext: as many records as have arrived (up to BUFFER); b"" at the end."""
        buf = bytearray(BUFFER)
        n = self.recv_many_into(memoryview(buf))
        del buf[n:]
        return bytes(buf)

    def recv_many_into(self, view: memoryview) -> int:
        """Decrypt into ``view`` as many records as have arrived (and fit); 0 at the end. One
        copy: from the TLS state straight into the caller's buffer."""
        while True:
            filled = 0
            with self._tls_lock:
                try:
                    while filled < len(view):
                        n = int(self._tls.read(len(view) - filled, view[filled:]))
                        if not n:
                            self._eof = True
                            break
                        filled += n
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
                answer = self._out.pending > 0  # e.g. a key update the client asked for
            if answer:
                self._flush()
            if filled:
                return filled
            if self._eof:
                return 0
            self._fill()

    def recv_into(self, buf: Any, nbytes: int = 0) -> int:
        view = memoryview(buf).cast("B")
        if nbytes:
            view = view[:nbytes]
        if not len(view):
            return 0
        while True:
            with self._tls_lock:
                try:
                    return int(self._tls.read(len(view), view))
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
                    return 0
            self._fill()

    def recv(self, size: int) -> bytes:
        buf = bytearray(size)
        n = self.recv_into(buf)
        return bytes(buf[:n])

    def _fill(self) -> None:
        n = self.raw.recv_into(self._wire)
        with self._tls_lock:
            if n:
                self._in.write(self._wire_view[:n])
            else:
                self._in.write_eof()

    # -- what http.server and the handler use of a socket -----------------------------------------
    def makefile(self, mode: str = "r", buffering: Optional[int] = None, **_: Any) -> Any:
        if "r" not in mode:
            raise ValueError("TLSConnection.makefile is read-only (answers go through sendall)")
        size = buffering if buffering and buffering > 0 else io.DEFAULT_BUFFER_SIZE
        return io.BufferedReader(_Reader(self), size)

    def settimeout(self, value: Optional[float]) -> None:
        self.raw.settimeout(value)

    def gettimeout(self) -> Optional[float]:
        return self.raw.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)

    def getpeername(self) -> Any:
        return self.raw.getpeername()

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()
