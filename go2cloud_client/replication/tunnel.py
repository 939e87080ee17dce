"""rsync's transport to the target: the agent's own executable as rsync's remote shell.

``rsync -e "<agent> rsync-tunnel" ... USER@go2cloud::MODULE/DEST`` starts this program with its
stdin and stdout connected to rsync (rsync appends ``[-l USER] HOST rsync --server --daemon .``,
which is ignored: the target decides what runs). It opens a TLS connection to the control plane
(the certificate pinned by the fingerprint the agent pinned at import; plain http only to a
loopback address), asks for ``POST /rsync/v1/tasks/<task>/session`` with ``Upgrade:
go2cloud-rsync``, the task's credentials in ``Authorization``, the cycle and the path, and after
``101 Switching Protocols`` copies rsync's bytes to the target as they are, and the target's
frames back: the daemon's output to rsync, its stderr to stderr, and its exit status as this
program's own (what ssh does as a remote shell: rsync learns from it whether the remote side
failed). So file-level data
shares the API's one port, firewall and proxy rules, and never crosses the network in plaintext.

Its settings come from the environment rsync passes on (:func:`tunnel_env`); the credentials
come from ``RSYNC_PASSWORD``, never from the command line. Refusals (wrong credentials, a cycle
that is not running) are printed on stderr, where rsync's caller collects them.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import socket
import ssl
import struct
import sys
import time
from typing import Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlsplit

from go2cloud_client.tlspin import PinMismatch, check_pin, client_context, is_loopback_host

ENV_URL = "GO2CLOUD_RSYNC_URL"
ENV_FINGERPRINT = "GO2CLOUD_RSYNC_FINGERPRINT"
ENV_CYCLE = "GO2CLOUD_RSYNC_CYCLE"
ENV_PATH = "GO2CLOUD_RSYNC_PATH"
ENV_EPOCH = "GO2CLOUD_RSYNC_EPOCH"
UPGRADE = "go2cloud-rsync"
CONNECT_TIMEOUT_S = 30.0
MAX_HEAD = 64 * 1024
BUFFER = 256 * 1024
#: exit status when the target refused or could not be reached (rsync then reports exit 12)
EXIT_REFUSED = 2
#: exit status when the connection ended before the target sent the daemon's status
EXIT_LOST = 255
#: target -> agent frames: kind, payload length (``go2cloud_server.rsyncd``)
FRAME = struct.Struct(">BI")
MAX_FRAME = 1 << 24


class TunnelError(Exception):
    """The tunnel could not be opened (the message says why)."""


def command(executable: Optional[str] = None) -> str:
    """The ``rsync -e`` value that starts this agent as the tunnel (rsync splits it on spaces and
    honours quotes): the frozen executable itself, or this Python with ``-m go2cloud_client``."""
    if getattr(sys, "frozen", False) or executable:
        return f"{shlex.quote(executable or sys.executable)} rsync-tunnel"
    here = os.path.abspath(__file__)
    marker = here.find(".pyz" + os.sep)
    if marker > 0:  # the agent runs as a zipapp: the archive is the program
        return f"{shlex.quote(sys.executable)} {shlex.quote(here[:marker + 4])} rsync-tunnel"
    return f"{shlex.quote(sys.executable)} -m go2cloud_client rsync-tunnel"


def tunnel_env(url: str, fingerprint: str, cycle: int, path: str, epoch: int = 0) -> Dict[str, str]:
    return {ENV_URL: url, ENV_FINGERPRINT: fingerprint, ENV_CYCLE: str(int(cycle)), ENV_PATH: path,
            ENV_EPOCH: str(int(epoch))}


def check_url(url: str) -> Tuple[str, str, int, str]:
    """(scheme, host, port, path) of ``https://HOST:PORT/rsync/v1/tasks/<task>`` (plain http only
    to a loopback host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise TunnelError(f"invalid rsync target URL {url!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise TunnelError("file-level data over plain http is allowed only to a loopback address")
    path = parts.path.rstrip("/")
    if not path.startswith("/rsync/v1/tasks/") or path.count("/") != 4:
        raise TunnelError(f"invalid rsync target URL path {parts.path!r}: expected /rsync/v1/tasks/<task>")
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), path


def open_session(env: Mapping[str, str]) -> socket.socket:
    """Connect, upgrade and return the raw stream to the target's rsync daemon."""
    url = env.get(ENV_URL, "")
    scheme, host, port, path = check_url(url)
    password = env.get("RSYNC_PASSWORD", "")
    cycle = env.get(ENV_CYCLE, "")
    src_path = env.get(ENV_PATH, "")
    if not password or not cycle.isdigit() or not src_path.startswith("/"):
        raise TunnelError(f"the rsync tunnel needs {ENV_CYCLE}, {ENV_PATH} and RSYNC_PASSWORD "
                          "(it is started by the agent's rsync)")
    raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock: socket.socket = raw
    try:
        if scheme == "https":
            ctx, pin = client_context(env.get(ENV_FINGERPRINT, ""))
            tls = ctx.wrap_socket(raw, server_hostname=host)
            sock = tls
            check_pin(tls, pin)
        host_header = f"[{host}]" if ":" in host else host
        request = (
            f"POST {path}/session HTTP/1.1\r\n"
            f"Host: {host_header}:{port}\r\n"
            f"Authorization: Bearer {password}\r\n"
            f"X-Go2cloud-Cycle: {int(cycle)}\r\n"
            f"X-Go2cloud-Epoch: {int(env.get(ENV_EPOCH) or 0)}\r\n"
            f"X-Go2cloud-Path: {quote(src_path, safe='/')}\r\n"
            f"Connection: Upgrade\r\nUpgrade: {UPGRADE}\r\nContent-Length: 0\r\n\r\n"
        )
        sock.sendall(request.encode("ascii"))
        status, body = _read_answer(sock)
        if status != 101:
            raise TunnelError(f"the target refused the rsync session (HTTP {status}): {_message(body)}")
        return sock
    except PinMismatch:
        sock.close()
        raise TunnelError(f"the target at {host}:{port} does not present the pinned certificate "
                          f"{env.get(ENV_FINGERPRINT, '')}: it changed or this is not the control "
                          "plane") from None
    except BaseException:
        sock.close()
        raise


def _read_answer(sock: socket.socket) -> Tuple[int, bytes]:
    """Status and (for an error) body of the answer, reading nothing beyond it."""
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        if not byte:
            raise TunnelError("the target closed the connection before answering")
        head += byte
        if len(head) > MAX_HEAD:
            raise TunnelError("the target's answer has an oversized header")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise TunnelError(f"the target answered {lines[0][:80]!r}, not HTTP") from None
    if status == 101:
        return status, b""
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = min(int(value.strip()), MAX_HEAD)
    body = b""
    while len(body) < length:
        part = sock.recv(length - len(body))
        if not part:
            break
        body += part
    return status, body


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body.decode("utf-8"))
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            return f"{err.get('message')} ({err.get('code')})"
    except (UnicodeDecodeError, ValueError):
        pass
    return body[:200].decode("utf-8", "replace") or "no details"


class _Frames:
    """Reads the target's frames: kind 0 data (to rsync), 1 the target daemon's stderr, 2 its
    exit status (a signed 32-bit integer), each ``>BI`` kind and length, then the payload."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: Optional[int] = None

    def feed(self, data: bytes, out: bytearray) -> None:
        self.buf += data
        while len(self.buf) >= FRAME.size:
            kind, length = FRAME.unpack_from(self.buf)
            if length > MAX_FRAME:
                raise TunnelError(f"the target sent a frame of {length} bytes")
            if len(self.buf) < FRAME.size + length:
                return
            payload = bytes(self.buf[FRAME.size:FRAME.size + length])
            del self.buf[:FRAME.size + length]
            if kind == 0:
                out += payload
            elif kind == 1:
                _write_all(2, payload)
            elif kind == 2 and length == 4:
                self.status = struct.unpack(">i", payload)[0]
            else:
                raise TunnelError(f"the target sent a frame of unknown kind {kind}")


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError:
        pass


def pump(sock: socket.socket, fd_in: int, fd_out: int) -> int:
    """Copy stdin to the connection as it is, and the target's frames to stdout and stderr, in
    one thread, until the target has sent its exit status and everything is written out.
    Returns the target daemon's exit status (as a remote shell does), or EXIT_LOST if the
    connection ended without one."""
    sock.setblocking(False)
    os.set_blocking(fd_in, False)
    os.set_blocking(fd_out, False)
    up = memoryview(bytearray(BUFFER))  # stdin -> target: up[lo:hi] waits to be sent
    lo = hi = 0
    down = bytearray()
    frames = _Frames()
    in_eof = sock_eof = False
    sel = selectors.PollSelector()  # masks change often: no epoll_ctl system call per change
    keys: Dict[object, int] = {}

    def want(obj: object, mask: int) -> None:
        old = keys.get(obj, 0)
        if mask == old:
            return
        if old and mask:
            sel.modify(obj, mask)  # type: ignore[arg-type]
        elif old:
            sel.unregister(obj)  # type: ignore[arg-type]
        else:
            sel.register(obj, mask)  # type: ignore[arg-type]
        if mask:
            keys[obj] = mask
        else:
            keys.pop(obj, None)

    try:
        while True:
            moved = False
            if lo == hi:
                lo = hi = 0
            if not in_eof and hi < BUFFER:
                try:
                    n = os.readv(fd_in, [up[hi:]])
                    if n:
                        hi += n
                        moved = True
                    else:
                        in_eof = True
                except BlockingIOError:
                    pass
            if lo < hi:
                try:
                    n = sock.send(up[lo:hi])
                    lo += n
                    if lo == hi:  # drained: the whole buffer is free for the next read
                        lo = hi = 0
                    moved = moved or n > 0
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    pass
            while not sock_eof and len(down) < BUFFER:  # SSL recv gives one record a call
                try:
                    data = sock.recv(BUFFER)
                    if data:
                        frames.feed(data, down)
                        moved = True
                    else:
                        sock_eof = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except (ssl.SSLEOFError, ConnectionResetError):
                    sock_eof = True
            if down:
                try:
                    n = os.write(fd_out, down)
                    del down[:n]
                    moved = moved or n > 0
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    down.clear()
            if (sock_eof or frames.status is not None) and not down:
                return frames.status if frames.status is not None else EXIT_LOST
            # every pass ends in poll(): a slow consumer is waited for, not chased
            want(sock, (selectors.EVENT_READ if not sock_eof and len(down) < BUFFER else 0)
                 | (selectors.EVENT_WRITE if lo < hi else 0))
            want(fd_in, selectors.EVENT_READ if not in_eof and hi < BUFFER else 0)
            want(fd_out, selectors.EVENT_WRITE if down else 0)
            if isinstance(sock, ssl.SSLSocket) and sock.pending() and not sock_eof and len(down) < BUFFER:
                continue  # decrypted data waits inside the SSL object: poll() would not see it
            if keys:
                sel.select(timeout=5.0)
            else:
                time.sleep(0.01)
    finally:
        sel.close()


def main(argv: List[str]) -> int:
    """``go2cloud_client rsync-tunnel ...`` (started by rsync, never by hand)."""
    if sys.stdin.isatty():
        sys.stderr.write("go2cloud_client rsync-tunnel is started by rsync for file-level migrations, "
                         "not by hand\n")
        return EXIT_REFUSED
    try:
        sock = open_session(os.environ)
    except (TunnelError, OSError, ssl.SSLError) as exc:
        sys.stderr.write(f"go2cloud rsync tunnel: {exc}\n")
        return EXIT_REFUSED
    try:
        status = pump(sock, sys.stdin.fileno(), sys.stdout.fileno())
    except (OSError, ssl.SSLError, TunnelError) as exc:
        sys.stderr.write(f"go2cloud rsync tunnel: connection lost: {exc}\n")
        return EXIT_LOST
    finally:
        sock.close()
    if status == EXIT_LOST:
        sys.stderr.write("go2cloud rsync tunnel: the connection ended before the target's rsync did\n")
    return status if 0 <= status <= 255 else EXIT_LOST
