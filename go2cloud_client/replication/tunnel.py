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
With the agent's proxy (``GO2CLOUD_RSYNC_PROXY``) the TCP connection is a CONNECT tunnel through
it; TLS and the pin check run end to end over it unchanged.

Its settings come from the environment rsync passes on (:func:`tunnel_env`); the credentials
come from ``RSYNC_PASSWORD``, never from the command line. Refusals (wrong credentials, a cycle
that is not running) are printed on stderr, where rsync's caller collects them.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import ssl
import stat
import struct
import sys
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlsplit

from go2cloud_client import subp
from go2cloud_client.errors import ProxyRefusedError
from go2cloud_client.proxy import ProxyURL, connect_via_proxy, parse_proxy_url
from go2cloud_client.tlspin import PinMismatch, check_pin, client_context, is_loopback_host

ENV_URL = "GO2CLOUD_RSYNC_URL"
ENV_FINGERPRINT = "GO2CLOUD_RSYNC_FINGERPRINT"
ENV_CYCLE = "GO2CLOUD_RSYNC_CYCLE"
ENV_PATH = "GO2CLOUD_RSYNC_PATH"
ENV_EPOCH = "GO2CLOUD_RSYNC_EPOCH"
#: rsync's --timeout: with it the target's daemon sends keep-alives at least every half of it
ENV_IO_TIMEOUT = "GO2CLOUD_RSYNC_IO_TIMEOUT"
#: the agent's proxy for the target (``http://[user:password@]HOST:PORT``): in the environment,
#: never on rsync's command line (the credentials)
ENV_PROXY = "GO2CLOUD_RSYNC_PROXY"
UPGRADE = "go2cloud-rsync"
CONNECT_TIMEOUT_S = 30.0
MAX_HEAD = 64 * 1024
BUFFER = 256 * 1024
#: how much plaintext the tunnel encrypts and sends at a time (see Stream.send)
SEND_SLICE = 64 * 1024
#: the size asked for the pipe rsync writes into (Linux allows up to /proc/sys/fs/pipe-max-size)
PIPE_SIZE = 1024 * 1024
#: how long the tunnel waits for the target's exit status once rsync has closed its end
EXIT_WAIT_S = 30.0
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


def tunnel_env(url: str, fingerprint: str, cycle: int, path: str, epoch: int = 0,
               proxy: Optional[ProxyURL] = None, io_timeout_s: int = 0) -> Dict[str, str]:
    env = {ENV_URL: url, ENV_FINGERPRINT: fingerprint, ENV_CYCLE: str(int(cycle)), ENV_PATH: path,
           ENV_EPOCH: str(int(epoch))}
    if io_timeout_s > 0:
        env[ENV_IO_TIMEOUT] = str(int(io_timeout_s))
    if proxy is not None:
        env[ENV_PROXY] = proxy.url
    return env


def _connect(host: str, port: int, proxy_url: str) -> socket.socket:
    """TCP to the target: direct, or a CONNECT tunnel through the agent's proxy."""
    if not proxy_url:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    try:
        proxy = parse_proxy_url(proxy_url)
    except ValueError as exc:
        raise TunnelError(f"invalid proxy in {ENV_PROXY}: {exc}") from None
    return connect_via_proxy(proxy, host, port, CONNECT_TIMEOUT_S)


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


class Stream:
    """The tunnel's connection: a blocking socket, with TLS done in memory (``ssl.SSLObject`` over
    two ``ssl.MemoryBIO``) rather than by an ``ssl.SSLSocket``. Two reasons: one system call moves
    many TLS records (an ``SSLSocket`` reads one 16 KiB record per call, header and body
    separately), and one thread may send while another receives (an ``SSLSocket`` must not be
    used from two threads at once; here the TLS state is touched only under a lock, and the
    socket's two directions are independent). ``tls`` is None for plain http to a loopback
    address."""

    def __init__(self, sock: socket.socket, tls: Optional[ssl.SSLObject] = None,
                 incoming: Optional[ssl.MemoryBIO] = None, outgoing: Optional[ssl.MemoryBIO] = None) -> None:
        self.sock = sock
        self.tls = tls
        self._in = incoming or ssl.MemoryBIO()
        self._out = outgoing or ssl.MemoryBIO()
        self._tls_lock = threading.Lock()  # the SSLObject and its two BIOs
        self._send_lock = threading.Lock()  # the order of encrypted bytes on the wire
        self._eof = False
        self.leftover = b""  # bytes received with the answer's head: the start of the stream

    @classmethod
    def connect(cls, sock: socket.socket, ctx: ssl.SSLContext, host: str) -> Stream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        stream = cls(sock, ctx.wrap_bio(incoming, outgoing, server_hostname=host), incoming, outgoing)
        stream._handshake()
        return stream

    def _handshake(self) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(BUFFER)
                if not data:
                    raise TunnelError("the target closed the connection during the TLS handshake") from None
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def getpeercert(self, binary_form: bool = False) -> Any:
        assert self.tls is not None
        return self.tls.getpeercert(binary_form)  # type: ignore[call-overload]

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data`` (not kept after the call returns)."""
        if self.tls is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        with self._send_lock:
            # SEND_SLICE at a time: the encrypted copy of a slice is small enough for malloc's
            # heap (a 256 KiB one would be mapped and unmapped on every call, a page fault per
            # 4 KiB)
            while view:
                with self._tls_lock:
                    piece = view[:SEND_SLICE]
                    while piece:
                        n = self.tls.write(piece)
                        piece = piece[n:]
                    wire = self._out.read()
                view = view[SEND_SLICE:]
                self.sock.sendall(wire)

    def recv(self) -> bytes:
        """The next bytes of the stream (as many as have arrived, up to about ``BUFFER``); b"" at
        the end."""
        if self.leftover:
            data, self.leftover = self.leftover, b""
            return data
        if self.tls is None:
            return self.sock.recv(BUFFER)
        while True:
            chunks: List[bytes] = []
            with self._tls_lock:
                try:
                    while len(chunks) < 32:
                        chunk = self.tls.read(BUFFER)
                        if not chunk:
                            self._eof = True
                            break
                        chunks.append(chunk)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
                answer = self._out.pending > 0  # e.g. a key update the peer asked for
            if answer:
                with self._send_lock, self._tls_lock:
                    wire = self._out.read()
                if wire:
                    self.sock.sendall(wire)
            if chunks:
                return b"".join(chunks)
            if self._eof:
                return b""
            data = self.sock.recv(BUFFER)
            with self._tls_lock:
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()

    def close(self) -> None:
        self.sock.close()


def open_session(env: Mapping[str, str]) -> Stream:
    """Connect, upgrade and return the stream to the target's rsync daemon."""
    url = env.get(ENV_URL, "")
    scheme, host, port, path = check_url(url)
    password = env.get("RSYNC_PASSWORD", "")
    cycle = env.get(ENV_CYCLE, "")
    src_path = env.get(ENV_PATH, "")
    if not password or not cycle.isdigit() or not src_path.startswith("/"):
        raise TunnelError(f"the rsync tunnel needs {ENV_CYCLE}, {ENV_PATH} and RSYNC_PASSWORD "
                          "(it is started by the agent's rsync)")
    raw = _connect(host, port, env.get(ENV_PROXY, ""))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = Stream(raw)
    try:
        if scheme == "https":
            ctx, pin = client_context(env.get(ENV_FINGERPRINT, ""))
            ctx.set_alpn_protocols([UPGRADE])  # the target routes the connection to its rsync pump
            stream = Stream.connect(raw, ctx, host)
            check_pin(stream, pin)
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
        stream.send(request.encode("ascii"))
        status, body = _read_answer(stream)
        if status != 101:
            raise TunnelError(f"the target refused the rsync session (HTTP {status}): {_message(body)}")
        raw.settimeout(None)  # from here on rsync's own --timeout watches the stream
        return stream
    except PinMismatch:
        stream.close()
        raise TunnelError(f"the target at {host}:{port} does not present the pinned certificate "
                          f"{env.get(ENV_FINGERPRINT, '')}: it changed or this is not the control "
                          "plane") from None
    except BaseException:
        stream.close()
        raise


def _read_answer(stream: Stream) -> Tuple[int, bytes]:
    """Status and (for an error) body of the answer; what came after the head stays in
    ``stream.leftover`` (the start of the rsync stream)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise TunnelError("the target's answer has an oversized header")
        data = stream.recv()
        if not data:
            raise TunnelError("the target closed the connection before answering")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise TunnelError(f"the target answered {lines[0][:80]!r}, not HTTP") from None
    if status == 101:
        stream.leftover = rest
        return status, b""
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = min(int(value.strip()), MAX_HEAD)
    body = rest
    while len(body) < length:
        part = stream.recv()
        if not part:
            break
        body += part
    return status, body[:length]


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
                try:
                    _write_all(2, payload)
                except OSError:
                    pass
            elif kind == 2 and length == 4:
                self.status = struct.unpack(">i", payload)[0]
            else:
                raise TunnelError(f"the target sent a frame of unknown kind {kind}")


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _cut(stream: Stream) -> None:
    try:
        stream.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _widen_pipe(fd: int) -> None:
    """Let rsync write up to PIPE_SIZE into the pipe to this tunnel before it has to wait (Linux:
    64 KiB by default), so each read here moves more; nothing happens if ``fd`` is no pipe or
    the system allows less."""
    try:
        import fcntl

        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (ImportError, OSError):
        pass


def pump(stream: Stream, fd_in: int, fd_out: int, idle_s: Optional[float] = None) -> int:
    """Copy stdin to the connection as it is (a thread of its own), and the target's frames to
    stdout and stderr (this thread), until the target has sent its exit status and everything
    is written out. Both directions block in their system calls: no polling, and each call
    moves as much as is there. Returns the target daemon's exit status (as a remote shell
    does), or EXIT_LOST if the connection ended without one."""
    os.set_blocking(fd_in, True)
    os.set_blocking(fd_out, True)
    _widen_pipe(fd_in)
    # a connection that brings nothing for idle_s (twice rsync's --timeout: the daemon's
    # keep-alives come every half of it) is stalled: ended here, because rsync cannot see it
    # (its own keep-alives still fit in the buffers between it and the stall, so its --timeout
    # never fires)
    stream.sock.settimeout(idle_s)
    failed: List[BaseException] = []

    def upstream() -> None:
        # one buffer for the whole session: a fresh 256 KiB object per read costs a page fault
        # per 4 KiB (glibc maps and unmaps blocks this large), measured as a quarter of the
        # tunnel's CPU time; the buffer is free again once send() returns (it encrypts in place)
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        try:
            while True:
                n = os.readv(fd_in, [buf])
                if not n:
                    # rsync closed its end (done, or gone after its --timeout): the target's exit
                    # status follows at once, unless the connection is stalled; rsync waits for
                    # this program to exit, so the wait is bounded
                    timer = threading.Timer(EXIT_WAIT_S, _cut, args=(stream,))
                    timer.daemon = True
                    timer.start()
                    return
                stream.send(view[:n])
        except (OSError, ssl.SSLError) as exc:
            failed.append(exc)
            _cut(stream)  # the downstream side sees the end

    threading.Thread(target=upstream, name="tunnel-up", daemon=True).start()
    frames = _Frames()
    out = bytearray()
    stdout_open = True
    while frames.status is None:
        try:
            data = stream.recv()
        except socket.timeout:
            sys.stderr.write(f"go2cloud rsync tunnel: nothing from the target for {idle_s:.0f} s: "
                             "the connection is stalled\n")
            data = b""
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            break
        frames.feed(data, out)
        if out:
            if stdout_open:
                try:
                    _write_all(fd_out, out)
                except BrokenPipeError:
                    stdout_open = False  # rsync is gone; its status still matters
            out.clear()
    return frames.status if frames.status is not None else EXIT_LOST


def main(argv: List[str]) -> int:
    """``go2cloud_client rsync-tunnel ...`` (started by rsync, never by hand)."""
    if sys.stdin.isatty():
        sys.stderr.write("go2cloud_client rsync-tunnel is started by rsync for file-level migrations, "
                         "not by hand\n")
        return EXIT_REFUSED
    # rsync killed (with the agent killed -9, see subp.StreamingProcess) takes this tunnel with
    # it: the target's daemon sees the connection end at once and keeps its partial file, instead
    # of waiting EXIT_WAIT_S for a status while the restarted agent already sends the cycle again
    subp.die_with_parent(os.getppid())
    try:
        stream = open_session(os.environ)
    except (TunnelError, OSError, ssl.SSLError, ProxyRefusedError) as exc:
        sys.stderr.write(f"go2cloud rsync tunnel: {exc}\n")
        return EXIT_REFUSED
    try:
        io_timeout = os.environ.get(ENV_IO_TIMEOUT, "")
        idle = 2.0 * int(io_timeout) if io_timeout.isdigit() and int(io_timeout) > 0 else None
        status = pump(stream, sys.stdin.fileno(), sys.stdout.fileno(), idle)
    except (OSError, ssl.SSLError, TunnelError) as exc:
        sys.stderr.write(f"go2cloud rsync tunnel: connection lost: {exc}\n")
        return EXIT_LOST
    finally:
        stream.close()
    if status == EXIT_LOST:
        sys.stderr.write("go2cloud rsync tunnel: the connection ended before the target's rsync did\n")
    return status if 0 <= status <= 255 else EXIT_LOST
