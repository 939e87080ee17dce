"""HTTPS API of the control plane (docs/protocol.md, docs/openapi.yaml).

``ThreadingHTTPServer`` with TLS done in each request thread (a slow handshake never blocks the
accept loop), a route table, JSON in and out, 1 MiB request cap and the error body of the
protocol. Request lines are logged with method, path, status and duration; bodies never are.

What the server waits for has a total deadline: the TLS handshake ``request_timeout_s`` (its
socket timeout, which CPython's ssl module applies to the whole handshake), and through
go2cloud_server/deadlines.py a request's line and headers ``request_timeout_s``, a body that plus
its size at ``BODY_MIN_RATE``. The wait for the next request of a keep-alive connection is bounded by the
socket timeout; handling a request (a long poll) is not bounded by either.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Optional, Pattern, Tuple, Union, cast
from urllib.parse import parse_qs, unquote, urlsplit

from go2cloud_server import auth, tlsstream
from go2cloud_server.blockrx import BlockReceiver
from go2cloud_server.deadlines import BODY_MIN_RATE, REQUEST_TIMEOUT_S, Deadline, Deadlines
from go2cloud_server.downloads import Download, Downloads
from go2cloud_server.errors import AuthFailed, InvalidInput, NotFound, ServerError, TooLarge
from go2cloud_server.rsyncd import RsyncSessions
from go2cloud_server.service import Service
from go2cloud_server.space import is_disk_full

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
#: file-level data: ``POST /rsync/v1/tasks/<task>/session`` upgraded to the rsync protocol
RSYNC_SESSION = re.compile(r"^/rsync/v1/tasks/([A-Za-z0-9._-]{1,64})/session$")
RSYNC_UPGRADE = "go2cloud-rsync"
#: the agent process's session (``POST /sources/{id}/session``) on every later agent request
SESSION_HEADER = "X-Go2cloud-Session"
#: JSON bodies nest at most this deep (the protocol's deepest document has a few levels).
MAX_JSON_DEPTH = 64
MAX_DRAIN = 16 * 1024 * 1024
#: after refusing a block request that is not the task's (before its body): read and drop at most
#: this much of the body, for at most LINGER_S, then close. Not a drain: it only spares a client
#: that sends a small body (a single chunk) a reset that would destroy the answer it is due
LINGER_BYTES = 1024 * 1024
LINGER_S = 2.0
SOCKET_TIMEOUT_S = 90
#: default listen backlog: a fleet of agents reconnecting at once after a restart (the kernel caps
#: it at net.core.somaxconn, 4096 on Linux >= 5.4)
LISTEN_BACKLOG = 4096

Handler = Callable[["ApiRequest"], Tuple[int, Any]]


class BodyBuffers:
    """Receive buffers of block requests, reused: a new zero-filled ``bytearray`` per 8 MiB batch
    cost ~5% of the receiver's CPU (the memset and the page faults). At most ``keep`` idle
    buffers are kept, so idle keep-alive connections hold no memory; requests beyond them get a
    fresh buffer that is dropped afterwards."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._idle: List[bytearray] = []
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        with self._lock:
            for i, buf in enumerate(self._idle):
                if len(buf) >= length:
                    return self._idle.pop(i)
            if self._idle:
                self._idle.pop()  # too small for this body: replaced by a larger one
        return bytearray(length)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(buf)


class ApiRequest:
    def __init__(
        self,
        method: str,
        path: str,
        query: Dict[str, List[str]],
        args: Tuple[str, ...],
        body: Any,
        headers: Any,
        client: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.args = args
        self.body = body
        self.headers = headers
        #: the peer's address (the TCP connection's, not a header): import throttling
        self.client = client

    def q(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[0] if values else None


class Routes:
    def __init__(self) -> None:
        self._routes: List[Tuple[str, Pattern[str], Handler, str]] = []

    def add(self, method: str, pattern: str, handler: Handler, auth_kind: str) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"([^/]+)", pattern) + "$"
        self._routes.append((method, re.compile(regex), handler, auth_kind))

    def match(self, method: str, path: str) -> Tuple[Handler, str, Tuple[str, ...]]:
        path_found = False
        for m, regex, handler, kind in self._routes:
            found = regex.match(path)
            if found:
                path_found = True
                if m == method:
                    return handler, kind, tuple(unquote(g) for g in found.groups())
        if path_found:
            raise InvalidInput(f"method {method} not allowed on {path}")
        raise NotFound(f"no such endpoint: {method} {path}")


class Api:
    """Binds the routes of the protocol to the service."""

    def __init__(
        self,
        service: Service,
        agent_auth: auth.AgentAuth,
        admin_token: str,
        block_receiver: Optional[BlockReceiver] = None,
        downloads: Optional[Downloads] = None,
        rsync_sessions: Optional[RsyncSessions] = None,
    ) -> None:
        self.service = service
        self.rsync_sessions = rsync_sessions
        self.block_receiver = block_receiver
        self.downloads = downloads
        self.agent_auth = agent_auth
        self.admin_token = admin_token
        self.routes = Routes()
        s = service
        r = self.routes.add
        p = "/api/v1"
        # agent API
        r("POST", f"{p}/sources/import", lambda q: (201, s.import_source(q.body, client=q.client)), "none")
        r("GET", f"{p}/time", lambda q: (200, s.server_time()), "none")
        r("POST", f"{p}/sources/{{s}}/challenge", self._challenge, "none")
        r("POST", f"{p}/sources/{{s}}/token", self._token, "none")
        r("POST", f"{p}/sources/{{s}}/session", lambda q: (200, s.open_session(q.args[0], q.body)), "session")
        r("POST", f"{p}/sources/{{s}}/heartbeat", lambda q: (200, s.heartbeat(q.args[0], q.body)), "agent")
        r("GET", f"{p}/sources/{{s}}/commands", self._commands, "agent")
        r(
            "POST",
            f"{p}/sources/{{s}}/commands/{{c}}",
            lambda q: (200, s.ack_command(q.args[0], q.args[1], q.body)),
            "agent",
        )
        r("GET", f"{p}/sources/{{s}}/tasks/{{t}}", lambda q: (200, s.agent_task(*q.args)), "agent")
        r("POST", f"{p}/sources/{{s}}/events", lambda q: (200, s.post_events(q.args[0], q.body)), "agent")
        # operator API
        r("POST", f"{p}/workgroups", lambda q: (201, s.create_workgroup(q.body)), "admin")
        r("GET", f"{p}/workgroups", lambda q: (200, s.list_workgroups()), "admin")
        r("GET", f"{p}/workgroups/{{wg}}", lambda q: (200, s.show_workgroup(q.args[0])), "admin")
        r("DELETE", f"{p}/workgroups/{{wg}}", lambda q: (200, s.delete_workgroup(q.args[0])), "admin")
        r("POST", f"{p}/workgroups/{{wg}}/codes", lambda q: (201, s.create_code(q.args[0], q.body)), "admin")
        r("GET", f"{p}/codes", lambda q: (200, s.list_codes(q.q("workgroup"))), "admin")
        r("POST", f"{p}/codes/{{t}}/revoke", lambda q: (200, s.revoke_code(q.args[0])), "admin")
        r("GET", f"{p}/sources", lambda q: (200, s.list_sources(q.q("workgroup"))), "admin")
        r("GET", f"{p}/sources/{{s}}", lambda q: (200, s.show_source(q.args[0])), "admin")
        r("POST", f"{p}/sources/{{s}}/associate", lambda q: (200, s.associate(q.args[0], q.body)), "admin")
        r("POST", f"{p}/sources/{{s}}/disassociate", lambda q: (200, s.disassociate(q.args[0])), "admin")
        r("POST", f"{p}/sources/{{s}}/replace", lambda q: (200, s.replace_source(q.args[0], q.body)), "admin")
        r(
            "POST",
            f"{p}/workgroups/{{wg}}/migration",
            lambda q: (200, s.start_migration(q.body, workgroup=q.args[0])),
            "admin",
        )
        r(
            "POST",
            f"{p}/sources/{{s}}/migration",
            lambda q: (200, s.start_migration(q.body, source=q.args[0])),
            "admin",
        )
        r(
            "GET",
            f"{p}/workgroups/{{wg}}/migration",
            lambda q: (200, s.workgroup_migration(q.args[0])),
            "admin",
        )
        r("GET", f"{p}/sources/{{s}}/migration", lambda q: (200, s.source_migration(q.args[0])), "admin")
        r(
            "POST",
            f"{p}/workgroups/{{wg}}/migration/{{a}}",
            lambda q: (200, s.migration_action(q.args[1], q.body, workgroup=q.args[0])),
            "admin",
        )
        r(
            "POST",
            f"{p}/sources/{{s}}/migration/{{a}}",
            lambda q: (200, s.migration_action(q.args[1], q.body, source=q.args[0])),
            "admin",
        )
        r("GET", f"{p}/tasks/{{t}}/artifacts", lambda q: (200, s.task_artifacts(q.args[0])), "admin")
        r("GET", f"{p}/sources/{{s}}/drill", lambda q: (200, s.source_drill(q.args[0])), "admin")

    def _challenge(self, q: ApiRequest) -> Tuple[int, Any]:
        self.service.agent_source(q.args[0])
        return 200, self.agent_auth.challenge(q.args[0])

    def _token(self, q: ApiRequest) -> Tuple[int, Any]:
        src = self.service.agent_source(q.args[0])
        body = q.body if isinstance(q.body, dict) else {}
        return 200, self.agent_auth.issue_token(
            src["id"], src["public_key"], body.get("nonce"), body.get("signature")
        )

    def _commands(self, q: ApiRequest) -> Tuple[int, Any]:
        raw = q.q("wait") or "0"
        try:
            wait = float(raw)
        except ValueError:
            raise InvalidInput("wait: must be a number of seconds 0-60") from None
        if not 0 <= wait <= 60:
            raise InvalidInput("wait: must be a number of seconds 0-60")
        return 200, self.service.poll_commands(q.args[0], wait)

    def handle(self, method: str, target: str, headers: Any, body: Any, client: str = "") -> Tuple[int, Any]:
        parts = urlsplit(target)
        handler, kind, args = self.routes.match(method, parts.path.rstrip("/") or "/")
        if kind == "admin":
            auth.check_admin(headers.get("Authorization"), self.admin_token)
        elif kind in ("agent", "session"):
            self.service.agent_source(args[0])
            self.agent_auth.check(headers.get("Authorization"), args[0])
            if kind == "agent":  # only the session's holder; its heartbeat renews the lease
                self.service.fence(args[0], headers.get(SESSION_HEADER),
                                   renew_lease=parts.path.rstrip("/").endswith("/heartbeat"))
        req = ApiRequest(method, parts.path, parse_qs(parts.query), args, body, headers, client)
        try:
            return handler(req)
        except Exception as exc:
            # the database's filesystem is full (images share it): release its reserve and answer
            # once more (the failed transaction was rolled back); see go2cloud_server/space.py
            space = getattr(self.service, "space", None)
            if space is None or not is_disk_full(exc) or not space.release(f"database write: {exc}"):
                raise
        return handler(req)


def json_depth(doc: Any) -> int:
    """How deep ``doc`` nests (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def parse_json_body(data: bytes) -> Any:
    """A request body as JSON: valid UTF-8, at most :data:`MAX_JSON_DEPTH` levels deep
    (InvalidInput otherwise, never a RecursionError)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("body: not valid UTF-8 JSON") from None
    except RecursionError:
        doc = None
    else:
        if json_depth(doc) <= MAX_JSON_DEPTH:
            return doc
    raise InvalidInput(f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep")


class _Answered(Exception):
    """The block receiver answered (carries its status and body to the common reply code)."""

    def __init__(self, status: int, payload: Any) -> None:
        super().__init__(status)
        self.status = status
        self.payload = payload


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "go2cloud_server"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S
    server: ApiServer
    _rx: Optional[bytearray] = None  # the receive buffer of the block request being handled
    _drop_after = 0  # body bytes to read and drop after the answer (a refused block request)
    _linger = False  # after the answer, a short bounded read before closing (see LINGER_BYTES)
    _deadline: Deadline

    def setup(self) -> None:
        super().setup()
        # a deadline cuts the TCP socket itself (also under a TLSConnection)
        self._deadline = Deadline(getattr(self.connection, "raw", self.connection), self.client_address[0])

    def handle_one_request(self) -> None:
        # waiting for a request (an idle keep-alive connection) is bounded by the socket timeout;
        # from its first byte, the request line and headers have a total deadline (disarmed in
        # _dispatch, before the request is handled)
        try:
            if not cast(io.BufferedReader, self.rfile).peek(1):  # makefile('rb', -1)
                self.close_connection = True
                return
        except OSError:  # the socket timeout, a reset
            self.close_connection = True
            return
        deadlines = self.server.deadlines
        deadlines.arm(self._deadline, self.server.request_timeout_s, "the request line and headers")
        try:
            super().handle_one_request()
        except OSError:
            if not self._deadline.expired:
                raise
        finally:
            deadlines.disarm(self._deadline)
        if self._deadline.expired:
            self.close_connection = True

    @contextlib.contextmanager
    def _body_deadline(self, length: int) -> Iterator[None]:
        """Reading a body of ``length`` bytes: the request timeout plus its size at BODY_MIN_RATE."""
        seconds = self.server.request_timeout_s + length / BODY_MIN_RATE
        self.server.deadlines.arm(self._deadline, seconds, f"a request body of {length} bytes")
        try:
            yield
        except OSError:  # the cut, seen by the TLS layer
            if not self._deadline.expired:
                raise
        finally:
            self.server.deadlines.disarm(self._deadline)
        if self._deadline.expired:
            self.close_connection = True
            raise InvalidInput(f"request body of {length} bytes not received within {seconds:.0f} s")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def _drain(self, length: int) -> None:
        """Read (and drop) a refused body so the client sees the 413 instead of a reset."""
        left = min(length, MAX_DRAIN)
        try:
            with self._body_deadline(left):
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
        except (OSError, InvalidInput):
            pass

    def _drop(self, length: int) -> int:
        """Read and drop ``length`` body bytes (after the answer); how many were read."""
        done = 0
        try:
            while done < length:
                chunk = self.rfile.read(min(length - done, 65536))
                if not chunk:
                    break
                done += len(chunk)
        except OSError:
            pass
        return done

    def _read_body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise InvalidInput("chunked request bodies are not supported: send Content-Length")
        raw_len = self.headers.get("Content-Length")
        try:
            length = int(raw_len) if raw_len else 0
        except ValueError:
            self.close_connection = True
            raise InvalidInput("Content-Length: not a number") from None
        if length < 0:
            self.close_connection = True
            raise InvalidInput("Content-Length: negative")
        if length > MAX_BODY:
            self.close_connection = True
            self._drain(length)
            raise TooLarge(f"request body of {length} bytes is over the limit of {MAX_BODY} bytes")
        if length == 0:
            return None
        with self._body_deadline(length):
            data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise InvalidInput("request body shorter than its Content-Length")
        return parse_json_body(data)

    def _read_raw(self, limit: int, buffers: BodyBuffers) -> Union[bytes, memoryview]:
        """Raw body of a block-target request (``limit`` from the receiver's route), in a buffer
        of ``buffers`` (bytes-like everywhere it goes: hash, zstd, ``os.pwrite``); the caller
        gives the buffer back once the request is answered (``self._rx``)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise InvalidInput("chunked request bodies are not supported: send Content-Length")
        raw_len = self.headers.get("Content-Length") or "0"
        if not raw_len.strip().isdigit() or len(raw_len.strip()) > 18:
            self.close_connection = True
            raise InvalidInput("Content-Length: not a non-negative number")
        length = int(raw_len)
        if length > limit:
            self.close_connection = True
            self._drain(length)
            raise TooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
        if not length:
            return b""
        # one buffer of the announced size, filled in place: what the header parse left in
        # rfile's buffer, then straight from the (TLS) socket, one record per call, without the
        # BufferedReader/SocketIO layers (a 1 MiB chunk is ~64 TLS records)
        buf = self._rx = buffers.take(length)
        view = memoryview(buf)[:length]
        with self._body_deadline(length):
            got = self.rfile.readinto1(view)
            while 0 < got < length:
                n = self.connection.recv_into(view[got:])
                if not n:
                    break
                got += n
        if got != length:
            self.close_connection = True
            raise InvalidInput("request body shorter than its Content-Length")
        return view

    def _handle_block(self, receiver: BlockReceiver) -> Tuple[int, Any]:
        # many small request/answer pairs on one connection: without TCP_NODELAY the answer's
        # body waits for the client's delayed ACK (40 ms per chunk)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        path = urlsplit(self.path).path
        buffers = self.server.body_buffers
        raw_len = (self.headers.get("Content-Length") or "0").strip()
        announced = int(raw_len) if raw_len.isdigit() and len(raw_len) <= 18 else None
        try:
            # route and token first, from the headers: the body of a request that is not the
            # task's is never read (nor drained: the connection is closed after the answer)
            req = receiver.authenticate(self.command, path, self.headers)
        except ServerError:
            if self.headers.get("Transfer-Encoding") or announced != 0:
                self.close_connection = True
                self._linger = True
            raise
        try:
            # then disk and sizes, still from the headers: the task's own refused request is
            # answered at once and its body dropped afterwards (at most the route's cap), so the
            # agent reads the answer instead of a reset connection
            req = receiver.admit(req, self.headers)
        except ServerError:
            if self.headers.get("Transfer-Encoding") or announced is None:
                self.close_connection = True
            elif announced > receiver.max_body(self.command, path):
                self.close_connection = True
            else:
                self._drop_after = announced
            raise
        # the task's bodies in memory at once are bounded (a buffer is filled per request)
        length = announced if announced is not None and announced <= req.max_body else 0
        try:
            receiver.reserve(req, length)
        except ServerError:
            self.close_connection = True
            self._linger = True
            raise
        try:
            body = self._read_raw(req.max_body, buffers)
            return receiver.serve(req, self.headers, body)
        finally:
            receiver.release(req, length)
            if self._rx is not None:  # nothing refers to the body once the request is handled
                buffers.give(self._rx)
                self._rx = None

    def _handle_rsync(self, task_id: str, sessions: RsyncSessions) -> int:
        """An agent's rsync connection: the task's credentials, cycle and path are checked from
        the headers (no body is read), then the connection is upgraded and handed to a
        single-use rsync daemon until it ends (``go2cloud_server.rsyncd``)."""
        self.close_connection = True
        if self.command != "POST":
            raise InvalidInput(f"method {self.command} not allowed on {urlsplit(self.path).path}")
        if (self.headers.get("Upgrade") or "").strip().lower() != RSYNC_UPGRADE:
            raise InvalidInput(f"this endpoint needs 'Upgrade: {RSYNC_UPGRADE}' (the agent's rsync "
                               "transport)")
        scheme, _, password = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not password:
            raise AuthFailed("missing task credentials (Authorization: Bearer)")
        raw_cycle = (self.headers.get("X-Go2cloud-Cycle") or "").strip()
        if not raw_cycle.isdigit() or len(raw_cycle) > 6:
            raise InvalidInput("header X-Go2cloud-Cycle: a cycle number is required")
        path = unquote(self.headers.get("X-Go2cloud-Path") or "", errors="strict")
        spec = self.server.api.service.rsync_session_spec(task_id, password.strip(), int(raw_cycle), path,
                                                          epoch=self.headers.get("X-Go2cloud-Epoch"))
        if isinstance(self.connection, ssl.SSLSocket):  # the credentials first: they say more
            raise InvalidInput(f"this connection did not announce the {RSYNC_UPGRADE} protocol (TLS "
                               "ALPN) the agent's rsync tunnel offers: update the agent")
        self.send_response(101)
        self.send_header("Upgrade", RSYNC_UPGRADE)
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        self.wfile.flush()
        try:
            rc = sessions.run(self.connection, spec)
        except Exception as exc:  # noqa: BLE001 - upgraded: there is no HTTP answer to send any more
            log.warning("rsync session of %s could not run: %s", task_id, exc)
            return 101
        log.info("%s rsync session of %s (cycle %s, %s): exit %s", self.client_address[0], task_id,
                 spec.cycle, spec.path, rc)
        try:  # a full target is the task's state at once (docs/reliability.md, section 4)
            self.server.api.service.rsync_session_ended(task_id, rc)
        except Exception:  # noqa: BLE001 - the session is over; the agent's acknowledgement follows
            log.warning("cannot record the end of the rsync session of %s", task_id, exc_info=True)
        return 101

    def _send_download(self, download: Download) -> int:
        """Stream a published file (headers, then the checked descriptor in 256 KiB pieces)."""
        try:
            self.send_response(200)
            self.send_header("Content-Type", download.content_type)
            self.send_header("Content-Length", str(download.size))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            left = download.size
            while left > 0:
                block = download.file.read(min(left, 256 * 1024))
                if not block:
                    break
                self.wfile.write(block)
                left -= len(block)
            if left:  # the file shrank while it was sent: the client sees a short body
                self.close_connection = True
        except OSError as exc:
            log.debug("download of %s interrupted: %s", download.name, exc)
            self.close_connection = True
        finally:
            download.close()
        return 200

    def _dispatch(self) -> None:
        self.server.deadlines.disarm(self._deadline)  # the headers are in: handling is not bounded
        if self._deadline.expired:  # cut while the headers came in: they may be incomplete
            self.close_connection = True
            return
        started = time.monotonic()
        status = 500
        retry_after: Optional[int] = None
        try:
            downloads = self.server.api.downloads
            if downloads is not None and downloads.owns(urlsplit(self.path).path):
                if self.command != "GET":
                    self.close_connection = True  # a body, if any, is not read
                answer = downloads.open(self.command, urlsplit(self.path).path)
                if isinstance(answer, Download):
                    status = self._send_download(answer)
                    self._log_request(status, started)
                    return
                raise _Answered(200, answer)
            rsync_task = RSYNC_SESSION.match(urlsplit(self.path).path)
            sessions = self.server.api.rsync_sessions
            if rsync_task is not None and sessions is not None:
                status = self._handle_rsync(rsync_task.group(1), sessions)
                self._log_request(status, started)
                return
            receiver = self.server.api.block_receiver
            if receiver is not None and receiver.owns(urlsplit(self.path).path):
                status, payload = self._handle_block(receiver)
                raise _Answered(status, payload)
            body = self._read_body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
            status, payload = self.server.api.handle(
                self.command, self.path, self.headers, body, client=str(self.client_address[0])
            )
        except _Answered as done:
            status, payload = done.status, done.payload
        except ServerError as exc:
            status = exc.http_status
            payload = {"error": {"code": exc.code, "message": exc.message}}
            if exc.retry_after is not None:
                retry_after = exc.retry_after
                payload["error"]["retry_after"] = retry_after
        except Exception:  # noqa: BLE001 - answer 500 and log the traceback
            log.exception("internal error on %s %s", self.command, urlsplit(self.path).path)
            status = 500
            payload = {"error": {"code": "internal_error", "message": "internal error: see the server log"}}
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:
            log.debug("could not send the answer: %s", exc)
            self.close_connection = True
        if self._drop_after and not self.close_connection:
            left, self._drop_after = self._drop_after, 0
            if self._drop(left) != left:
                self.close_connection = True
        if self._linger:
            self._linger = False
            self._linger_read()
        self._log_request(status, started)

    def _linger_read(self) -> None:
        """Before closing a connection whose request body was not read: take in what the client
        already sent, at most LINGER_BYTES within LINGER_S (closing a socket with unread data
        resets the connection, and the reset destroys the answer before the client reads it)."""
        deadline = time.monotonic() + LINGER_S
        left = LINGER_BYTES
        try:
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self.connection.settimeout(wait)
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _log_request(self, status: int, started: float) -> None:
        log.info(
            "%s %s %s -> %d (%.0f ms)",
            self.client_address[0],
            self.command,
            urlsplit(self.path).path,
            status,
            (time.monotonic() - started) * 1000,
        )

    do_GET = _dispatch  # noqa: N815
    do_POST = _dispatch  # noqa: N815
    do_DELETE = _dispatch  # noqa: N815
    do_PUT = _dispatch  # noqa: N815


def somaxconn() -> Optional[int]:
    """The kernel's cap on a listen backlog (``net.core.somaxconn``), None where unknown."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: Tuple[str, int],
        api: Api,
        ssl_context: Optional[ssl.SSLContext],
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        #: connections the kernel queues before ``accept`` (a fleet reconnecting at once after a
        #: restart); the kernel caps it at net.core.somaxconn
        self.request_queue_size = backlog
        self.api = api
        self.ssl_context = ssl_context
        self.body_buffers = BodyBuffers()
        #: total time for a TLS handshake, and for a request line and headers (seconds)
        self.request_timeout_s = request_timeout_s
        self.deadlines = Deadlines()
        super().__init__(address, RequestHandler)

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.close()

    def get_request(self) -> Tuple[socket.socket, Any]:
        """Accept a connection with TCP_NODELAY set: an answer is one small write after the
        request, and without it the kernel holds that write until the client's delayed ACK
        (+40 ms per request on a keep-alive connection)."""
        conn, addr = self.socket.accept()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a test's socket pair)
            pass
        return conn, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        conn: Any
        try:
            started = time.monotonic()
            offer = tlsstream.peek_alpn(request, self.request_timeout_s)
            # one total deadline from the first byte to the end of the handshake
            left = self.request_timeout_s - (time.monotonic() - started)
            if left <= 0:
                raise socket.timeout("no ClientHello within the request timeout")
            if offer is not None and tlsstream.RSYNC_ALPN in offer:
                # an agent's rsync session: TLS in memory, so its stream can flow both ways at
                # once (go2cloud_server.tlsstream)
                conn = tlsstream.TLSConnection.accept(request, self.ssl_context, left)
            else:
                # the socket timeout of a handshake is its total deadline (CPython's ssl module
                # counts it across the handshake's reads), so a trickled ClientHello is cut too
                request.settimeout(left)
                conn = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            conn.settimeout(SOCKET_TIMEOUT_S)
            self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]
        finally:
            try:
                conn.close()
            except OSError:
                pass

    @property
    def port(self) -> int:
        return int(self.server_address[1])
