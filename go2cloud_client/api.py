"""Client for the control plane's agent API (docs/protocol.md).

:class:`ControlPlane` makes plain calls: one HTTP request each (plus one re-authentication on a
401), every response size-capped and schema-checked, every failure mapped to an error type from
:mod:`go2cloud_client.errors`. :class:`RetryingControlPlane` wraps it with capped, jittered
exponential backoff for retryable errors only (restic's ``backend/retry`` pattern).

Secrets (token code, bearer token, target password) never go into URLs or logs: requests are
logged as method + path + status only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Type
from urllib.parse import quote, urlsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter

from go2cloud_client import __version__, backoff
from go2cloud_client.errors import (
    SERVER_CODES,
    Go2CloudError,
    IdentityRejectedError,
    ProtocolError,
    RequestRejectedError,
    ServerError,
    ServerUnreachableError,
    SessionBusyError,
    ThrottledError,
    TLSError,
    UsageError,
)
from go2cloud_client.identity import Identity
from go2cloud_client.proxy import ProxySettings, ProxyURL
from go2cloud_client.proxy import refused as proxy_refused
from go2cloud_client.tlspin import https_adapter, is_loopback_host, normalize_fingerprint

LOG = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
API_PREFIX = "/api/v1"
#: the agent process's session on every agent API request once opened (fencing)
SESSION_HEADER = "X-Go2cloud-Session"
_SOURCE_ID_RE = re.compile(r"^s-[A-Za-z0-9]{1,64}$")
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: Renew the bearer token this many seconds before it expires.
_TOKEN_MARGIN_S = 30.0
#: The longest ``Retry-After`` (429/503) the agent waits before retrying; a longer one is cut.
RETRY_AFTER_MAX_S = 300.0


def _field(doc: Mapping[str, Any], name: str, kind: Any, where: str, *, optional: bool = False) -> Any:
    if name not in doc or doc[name] is None:
        if optional:
            return None
        raise ProtocolError(f"the control plane's {where} response has no field {name!r}")
    value = doc[name]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, (int, float)))
    if not ok:
        raise ProtocolError(f"the control plane's {where} response has a malformed field {name!r}")
    return value


class ControlPlane:
    """Plain calls to the agent API. Thread-safe for use from the heartbeat and command threads."""

    def __init__(
        self,
        server: str,
        *,
        fingerprint: Optional[str] = None,
        source_id: Optional[str] = None,
        identity: Optional[Identity] = None,
        connect_timeout: float = 15.0,
        read_timeout: float = 30.0,
        agent_version: str = __version__,
        session: Optional[requests.Session] = None,
        proxy: Optional[ProxySettings] = None,
    ) -> None:
        #: the control plane's URLs (replicas: ``server`` may list several, comma-separated); the
        #: agent talks to one at a time and moves to the next when it cannot reach it
        self.servers = [u.strip().rstrip("/") for u in server.split(",") if u.strip()] or [server]
        for url in self.servers:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(f"invalid control plane URL {url!r}: use https://HOST[:PORT]")
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                raise UsageError(
                    f"refusing plain http:// to {parts.hostname}: the control plane must be reached over "
                    "https:// (plain HTTP is accepted only for loopback addresses)"
                )
        self.server = self.servers[0]
        self.source_id = source_id
        self.identity = identity
        self.agent_version = agent_version
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.fingerprint = normalize_fingerprint(fingerprint) if fingerprint else None
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = f"go2cloud_client/{agent_version}"
        self.session.headers["Accept"] = "application/json"
        self.session.mount("https://", https_adapter(self.fingerprint))
        self.session.mount("http://", HTTPAdapter(max_retries=0))
        # the agent's own proxy setting is the only one used (not requests' reading of the
        # environment, which the other channels could not follow): CONNECT, then TLS end to end
        self.session.trust_env = False
        self._proxy_settings = proxy or ProxySettings()
        self.proxy: Optional[ProxyURL] = None
        self._use(self.server)
        self._server_lock = threading.Lock()
        self._token: Optional[str] = None
        self._token_deadline = 0.0
        self._token_lock = threading.RLock()  # a failover while authenticating drops the token
        #: this agent process's session (fencing): sent as X-Go2cloud-Session once opened
        self.session_instance: Optional[str] = None
        self.epoch = 0
        #: commands skipped because they cannot be acknowledged (logged once each)
        self._skipped_commands: Set[str] = set()

    def close(self) -> None:
        self.session.close()

    def _use(self, server: str) -> None:
        self.server = server
        self.proxy = self._proxy_settings.for_url(server)
        self.session.proxies = {"https": self.proxy.url, "http": self.proxy.url} if self.proxy else {}

    def _fail_over(self, failed: str) -> None:
        """``failed`` could not be reached: the next URL is used from now on (once per failure,
        however many threads saw it). Its bearer token was that replica's: a new one is asked."""
        if len(self.servers) < 2:
            return
        with self._server_lock:
            if self.server != failed:
                return
            nxt = self.servers[(self.servers.index(failed) + 1) % len(self.servers)]
            LOG.warning("the control plane at %s cannot be reached: trying %s", failed, nxt)
            self._use(nxt)
        self._drop_token()

    # -- transport --------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.server}{API_PREFIX}{path}"

    def _send(
        self,
        method: str,
        path: str,
        *,
        body: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, Any]] = None,
        auth: bool = True,
        read_timeout: Optional[float] = None,
        what: str = "",
    ) -> Any:
        """One request; returns the decoded JSON body of a 2xx response. With ``auth`` a 401 is
        answered by getting a new token once and repeating the request."""
        for attempt in (1, 2):
            headers = {}
            if auth:
                headers["Authorization"] = f"Bearer {self._bearer(force=attempt == 2)}"
            try:
                return self._request(method, path, body=body, params=params, headers=headers,
                                     read_timeout=read_timeout, what=what)
            except _Unauthorized as exc:
                if not auth or attempt == 2:
                    raise IdentityRejectedError(
                        f"the control plane rejected this agent's credentials ({exc.message}); "
                        "if the source was deleted, run go2cloud_client --abort and import again"
                    ) from None
                LOG.info("bearer token refused (%s); re-authenticating", exc.code)
                self._drop_token()
        raise AssertionError("unreachable")

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: Optional[Mapping[str, Any]],
        params: Optional[Mapping[str, Any]],
        headers: Dict[str, str],
        read_timeout: Optional[float],
        what: str,
    ) -> Any:
        server = self.server
        url = f"{server}{API_PREFIX}{path}"
        what = what or path
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.session_instance:
            headers[SESSION_HEADER] = self.session_instance
        timeout = (self.connect_timeout, read_timeout or self.read_timeout)
        started = time.monotonic()
        try:
            resp = self.session.request(method, url, data=data, params=params, headers=headers,
                                        timeout=timeout, stream=True, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(exc) from None
        except requests.exceptions.ProxyError as exc:
            raise self._proxy_error(exc) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            err = ServerUnreachableError(
                f"cannot reach the control plane at {server} ({_short_reason(exc)}); check the "
                "network, the firewall and the --server URL"
            )
            err.request_sent = not _connect_failure(exc)  # type: ignore[attr-defined]
            self._fail_over(server)  # the retry goes to the next replica
            raise err from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnreachableError(
                f"request to the control plane at {self.server} failed ({_short_reason(exc)})"
            ) from None
        try:
            raw = self._read_capped(resp, what)
        finally:
            resp.close()
        LOG.debug("%s %s -> %s (%.0f ms, %d bytes)", method, path, resp.status_code,
                  (time.monotonic() - started) * 1000, len(raw))
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and len(raw) < int(declared):
            # urllib3 may hand over a body cut short by a closed connection without an error
            raise ServerUnreachableError(
                f"the connection to the control plane at {self.server} was cut in the middle of the "
                f"{what} response ({len(raw)} of {int(declared)} bytes); it will be retried")
        if 200 <= resp.status_code < 300:
            return self._decode(raw, what)
        self._raise_for_error(resp.status_code, raw, what, retry_after=_retry_after(resp.headers))
        raise AssertionError("unreachable")

    def _read_capped(self, resp: requests.Response, what: str) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise ProtocolError(
                f"the control plane's {what} response is too large ({int(declared)} bytes, limit "
                f"{MAX_RESPONSE_BYTES})"
            )
        buf = bytearray()
        try:
            for chunk in resp.iter_content(chunk_size=65536):
                buf += chunk
                if len(buf) > MAX_RESPONSE_BYTES:
                    raise ProtocolError(
                        f"the control plane's {what} response is larger than {MAX_RESPONSE_BYTES} bytes"
                    )
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.Timeout) as exc:
            raise ServerUnreachableError(
                f"the connection to the control plane at {self.server} broke while reading the "
                f"{what} response ({_short_reason(exc)}); check the network"
            ) from None
        return bytes(buf)

    @staticmethod
    def _decode(raw: bytes, what: str) -> Any:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"the control plane's {what} response is not valid JSON") from None
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
                # valid so far, then it stops: the connection was cut, the server is not wrong
                raise ServerUnreachableError(
                    f"the {what} response of the control plane ended in the middle ({len(raw)} bytes: "
                    "the connection was cut); it will be retried") from None
            raise ProtocolError(f"the control plane's {what} response is not valid JSON") from None
        except ValueError:
            raise ProtocolError(f"the control plane's {what} response is not valid JSON") from None
        except RecursionError:
            raise ProtocolError(f"the control plane's {what} response is JSON nested too deeply") from None

    def _raise_for_error(self, status: int, raw: bytes, what: str, *,
                         retry_after: Optional[float] = None) -> None:
        code, message = "", ""
        try:
            doc = json.loads(raw.decode("utf-8"))
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict):
                code = str(err["code"]) if isinstance(err.get("code"), str) else ""
                message = str(err["message"]) if isinstance(err.get("message"), str) else ""
        except (UnicodeDecodeError, ValueError, RecursionError):
            pass
        message = _clip(message) or f"HTTP {status}"
        if status == 401:
            raise _Unauthorized(code or "unauthorized", message)
        cls: Optional[Type[Go2CloudError]] = SERVER_CODES.get(code)
        if cls is ThrottledError or status == 429 or (status == 503 and retry_after is not None):
            raise ThrottledError(
                f"the control plane is throttling {what} (HTTP {status}, {code or 'no code'}): {message}",
                retry_after=retry_after)
        if cls is SessionBusyError:
            raise SessionBusyError(message, retry_after=retry_after)
        if cls is not None:
            raise cls(_operator_message(cls, message))
        if status >= 500:
            raise ServerError(f"the control plane failed on {what} (HTTP {status}, {code or 'no code'}): "
                              f"{message}; it will be retried")
        if 300 <= status < 400:
            raise ProtocolError(f"the control plane answered {what} with a redirect (HTTP {status}); "
                                "check the --server URL")
        raise RequestRejectedError(f"the control plane refused {what} (HTTP {status}, {code or 'no code'}): "
                                   f"{message}")

    def _proxy_error(self, exc: Exception) -> Go2CloudError:
        """A refusal by the proxy (ProxyRefusedError), or the proxy out of reach (retried)."""
        assert self.proxy is not None
        target = urlsplit(self.server).netloc
        refused = re.search(r"Tunnel connection failed: (\d{3}) ?([^'\")]*)", str(exc))
        if refused:
            return proxy_refused(self.proxy, target, int(refused.group(1)), refused.group(2))
        err = ServerUnreachableError(
            f"cannot reach the control plane at {self.server} through the proxy {self.proxy.display} "
            f"({_short_reason(exc)}); check that the proxy is running and reachable from this host")
        err.request_sent = False  # type: ignore[attr-defined]
        return err

    def _tls_error(self, exc: Exception) -> TLSError:
        text = str(exc)
        if self.fingerprint and "ingerprint" in text:
            return TLSError(
                f"the certificate of {self.server} does not match the pinned fingerprint "
                f"{self.fingerprint}; check --server-fingerprint against the control plane's "
                "certificate (go2cloud_server prints it) and that --server points at it"
            )
        return TLSError(
            f"TLS with {self.server} failed ({_short_reason(exc)}); if the control plane uses its "
            "own certificate, pass --server-fingerprint sha256:<hex> as printed by go2cloud_server"
        )

    # -- authentication ---------------------------------------------------------------------

    def _require_source(self) -> str:
        if not self.source_id or self.identity is None:
            raise AssertionError("ControlPlane has no source identity (call after import)")
        return self.source_id

    def _drop_token(self) -> None:
        with self._token_lock:
            self._token = None
            self._token_deadline = 0.0

    def _bearer(self, *, force: bool = False) -> str:
        with self._token_lock:
            if force or self._token is None or time.monotonic() >= self._token_deadline:
                self._token, expires_in = self._authenticate()
                self._token_deadline = time.monotonic() + max(1.0, expires_in - _TOKEN_MARGIN_S)
            return self._token

    def _authenticate(self) -> Tuple[str, float]:
        source_id = self._require_source()
        assert self.identity is not None
        sid = quote(source_id, safe="")
        try:
            doc = self._request("POST", f"/sources/{sid}/challenge", body={}, params=None, headers={},
                                read_timeout=None, what="challenge")
            nonce = _field(_obj(doc, "challenge"), "nonce", str, "challenge")
            signature = self.identity.sign_token_challenge(source_id, nonce)
            doc = self._request("POST", f"/sources/{sid}/token",
                                body={"nonce": nonce, "signature": signature},
                                params=None, headers={}, read_timeout=None, what="token")
        except _Unauthorized as exc:
            raise IdentityRejectedError(
                f"the control plane did not accept this agent's key ({exc.message}); run "
                "go2cloud_client --abort and import again"
            ) from None
        doc = _obj(doc, "token")
        token = _field(doc, "token", str, "token")
        expires_in = _field(doc, "expires_in", (int, float), "token", optional=True) or 300
        LOG.debug("got a bearer token valid for %ss", expires_in)
        return token, float(expires_in)

    def authenticate(self) -> None:
        """Get a bearer token now (proves the identity; raises IdentityRejectedError if not)."""
        self._bearer(force=True)

    # -- agent API --------------------------------------------------------------------------

    def import_source(
        self,
        *,
        token_id: str,
        token_code: str,
        public_key: str,
        inventory: Mapping[str, Any],
        previous_source_id: Optional[str] = None,
        previous_source_proof: Optional[Mapping[str, str]] = None,
    ) -> Dict[str, Any]:
        body = {
            "token_id": token_id,
            "token_code": token_code,
            "public_key": public_key,
            "agent_version": self.agent_version,
            "previous_source_id": previous_source_id,
            "previous_source_proof": dict(previous_source_proof) if previous_source_proof else None,
            "inventory": dict(inventory),
        }
        doc = _obj(self._send("POST", "/sources/import", body=body, auth=False, what="import"), "import")
        source_id = _field(doc, "source_id", str, "import")
        if not _SOURCE_ID_RE.match(source_id):
            raise ProtocolError("the control plane's import response has a malformed field 'source_id'")
        workgroup = _field(doc, "workgroup", dict, "import")
        _field(workgroup, "id", str, "import workgroup")
        _field(workgroup, "name", str, "import workgroup")
        interval = _field(doc, "heartbeat_interval", (int, float), "import", optional=True)
        _field(doc, "server_time_epoch", (int, float), "import", optional=True)
        doc["heartbeat_interval"] = interval or 10
        replaced = doc.get("replaced_source_id")
        doc["replaced_source_id"] = replaced if isinstance(replaced, str) else None
        return doc

    def replace_proof(self, old_source_id: str, old_identity: Identity,
                      new_public_key: str) -> Dict[str, str]:
        """``previous_source_proof`` for an import: a challenge of the old source signed with its
        key over the old id and the new public key (docs/protocol.md, Import). Raises
        IdentityRejectedError when the control plane no longer knows the old source."""
        if not _SOURCE_ID_RE.match(old_source_id):
            raise ValueError(f"invalid source id {old_source_id!r}")
        try:
            doc = self._request("POST", f"/sources/{quote(old_source_id, safe='')}/challenge", body={},
                                params=None, headers={}, read_timeout=None, what="challenge")
        except _Unauthorized as exc:
            raise IdentityRejectedError(
                f"the control plane refused the old source's challenge ({exc.message})") from None
        nonce = _field(_obj(doc, "challenge"), "nonce", str, "challenge")
        signature = old_identity.sign_replacement(old_source_id, new_public_key, nonce)
        return {"nonce": nonce, "signature": signature}

    def server_time(self) -> float:
        """The control plane's clock (``GET /api/v1/time``, no authentication) as epoch seconds."""
        doc = _obj(self._send("GET", "/time", auth=False, what="time"), "time")
        return float(_field(doc, "server_time_epoch", (int, float), "time"))

    def open_session(self, session_id: str, instance: str, fingerprint: Mapping[str, Any]) -> int:
        """Take the source's lease for this agent process (docs/protocol.md, "Fencing"); later
        requests carry ``instance``. Returns the epoch. Raises SessionBusyError (another process
        holds it for now: retry after ``retry_after``) or SessionConflictError (another live agent)."""
        sid = quote(self._require_source(), safe="")
        body = {"session_id": session_id, "instance": instance, "fingerprint": dict(fingerprint)}
        doc = _obj(self._send("POST", f"/sources/{sid}/session", body=body, what="session"), "session")
        epoch = _field(doc, "epoch", int, "session")
        if epoch < 1:
            raise ProtocolError("the control plane's session response has a malformed field 'epoch'")
        self.session_instance = instance
        self.epoch = epoch
        return epoch

    def heartbeat(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        sid = quote(self._require_source(), safe="")
        doc = _obj(self._send("POST", f"/sources/{sid}/heartbeat", body=payload, what="heartbeat"),
                   "heartbeat")
        _field(doc, "server_time_epoch", (int, float), "heartbeat", optional=True)
        _field(doc, "commands_waiting", bool, "heartbeat", optional=True)
        _field(doc, "heartbeat_interval", (int, float), "heartbeat", optional=True)
        return doc

    def poll_commands(self, wait: int = 25) -> List[Dict[str, Any]]:
        """The commands waiting for this source. One malformed command never hides the others:
        a command without a usable id (not ``[A-Za-z0-9._-]{1,128}``: it could not be
        acknowledged, or would change the acknowledgement's URL) is skipped and logged once; any
        other defect (type, params) is left to the command layer, which acknowledges it
        ``rejected`` or ``unsupported``."""
        sid = quote(self._require_source(), safe="")
        wait = max(0, min(60, int(wait)))
        doc = _obj(self._send("GET", f"/sources/{sid}/commands", params={"wait": wait},
                              read_timeout=self.read_timeout + wait, what="commands"), "commands")
        commands = _field(doc, "commands", list, "commands")
        out = []
        for item in commands:
            cid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(cid, str) or not _SAFE_ID_RE.match(cid):
                self._skip_command(item)
                continue
            if item.get("params") is None:
                item["params"] = {}  # anything else is validated (and rejected) by the command layer
            out.append(item)
        return out

    def _skip_command(self, item: Any) -> None:
        key = repr(item.get("id") if isinstance(item, dict) else item)[:200]
        if key in self._skipped_commands:
            return
        if len(self._skipped_commands) < 1000:
            self._skipped_commands.add(key)
        LOG.warning("the control plane sent a command without a usable id (%s): skipped, it cannot be "
                    "acknowledged; the other commands run (report this to the control plane's operator)",
                    key)

    def ack(
        self,
        command_id: str,
        status: str,
        *,
        error_code: Optional[str] = None,
        message: Optional[str] = None,
        result: Optional[Mapping[str, Any]] = None,
    ) -> None:
        sid = quote(self._require_source(), safe="")
        if not _SAFE_ID_RE.match(command_id):
            raise ValueError(f"invalid command id {command_id!r}")
        body = {"status": status, "error_code": error_code, "message": message, "result": dict(result or {})}
        self._send("POST", f"/sources/{sid}/commands/{quote(command_id, safe='')}", body=body, what="ack")

    def get_task(self, task_id: str) -> Dict[str, Any]:
        sid = quote(self._require_source(), safe="")
        if not _SAFE_ID_RE.match(task_id):
            raise ValueError(f"invalid task id {task_id!r}")
        doc = _obj(self._send("GET", f"/sources/{sid}/tasks/{quote(task_id, safe='')}", what="task"), "task")
        _field(doc, "task_id", str, "task")
        _field(doc, "paths", list, "task")
        _field(doc, "target", dict, "task")
        return doc

    def post_events(self, events: List[Mapping[str, Any]]) -> None:
        sid = quote(self._require_source(), safe="")
        self._send("POST", f"/sources/{sid}/events", body={"events": list(events)[:100]}, what="events")


class _Unauthorized(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


def _obj(doc: Any, what: str) -> Dict[str, Any]:
    if not isinstance(doc, dict):
        raise ProtocolError(f"the control plane's {what} response is not a JSON object")
    return doc


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    verify = re.search(r"certificate verify failed: ([^(')]+)", text)
    if verify:
        return "certificate verify failed: " + verify.group(1).strip()
    for marker in ("Failed to establish a new connection: ", "Caused by ", "SSLError("):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>:?\s*", "", text)
    return _clip(text.strip("()'\" ,"), 160) or type(exc).__name__


def _retry_after(headers: Mapping[str, str]) -> Optional[float]:
    """Seconds of a ``Retry-After: N`` header (a date or garbage counts as absent)."""
    value = (headers.get("Retry-After") or "").strip()
    if not value.isdigit():
        return None
    return float(min(int(value), 86400))


def _connect_failure(exc: Exception) -> bool:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    text = str(exc)
    return any(m in text for m in ("NewConnectionError", "Failed to establish", "Name or service",
                                   "Connection refused", "No route to host", "nodename nor servname"))


_CODE_HINTS = {
    "code_unknown": "check the token id and token code (copy them again from the console)",
    "code_expired": "create a new activation code in the console",
    "code_exhausted": "create a new activation code or raise its use count",
    "code_revoked": "create a new activation code in the console",
    "source_unknown": "run go2cloud_client --abort, then import again with a valid activation code",
    "source_replaced": "this host was imported again elsewhere; run go2cloud_client --abort to forget "
                       "this import",
}


def _operator_message(cls: Type[Go2CloudError], server_message: str) -> str:
    hint = _CODE_HINTS.get(cls.code)
    if cls is IdentityRejectedError:
        hint = _CODE_HINTS["source_unknown"]
    base = server_message or cls.summary
    if hint and hint.split(" (")[0].split(";")[0] not in base:
        return f"{base}; {hint}"
    return base


# -- retry wrapper ---------------------------------------------------------------------------


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, Go2CloudError) and exc.retryable


def retry_after_of(exc: Optional[BaseException]) -> Optional[float]:
    """The wait a throttled request was told (``Retry-After``), at most RETRY_AFTER_MAX_S; None
    for other errors (they back off exponentially)."""
    if isinstance(exc, ThrottledError) and exc.retry_after is not None:
        return max(0.0, min(float(exc.retry_after), RETRY_AFTER_MAX_S))
    return None


class _RetryAfterOrBackoff:
    """Tenacity wait: the control plane's ``Retry-After`` when it throttled the request (bounded
    by RETRY_AFTER_MAX_S), else ``backoff`` (capped, jittered exponential)."""

    def __init__(self, backoff: Any) -> None:
        self.backoff = backoff

    def __call__(self, state: tenacity.RetryCallState) -> float:
        told = retry_after_of(state.outcome.exception() if state.outcome else None)
        return told if told is not None else float(self.backoff(state))


class RetryingControlPlane:
    """Wraps a :class:`ControlPlane`: retryable errors (unreachable, 5xx, malformed responses)
    are retried with capped, jittered exponential backoff; permanent ones (code errors, identity
    rejected, 4xx) are raised at once.

    ``attempts`` None retries until ``stop_event`` is set. ``on_retry(exc, attempt)`` is called
    before each wait (the agent uses it to log one warning per outage). Import is retried only
    when the request never reached the server (a retried import would consume another use of the
    activation code)."""

    def __init__(
        self,
        inner: ControlPlane,
        *,
        attempts: Optional[int] = 5,
        max_wait: float = 30.0,
        multiplier: float = 0.5,
        stop_event: Optional[threading.Event] = None,
        on_retry: Optional[Callable[[BaseException, int], None]] = None,
        sleep: Optional[Callable[[float], None]] = None,
    ) -> None:
        self.inner = inner
        self.attempts = attempts
        self.max_wait = max_wait
        self.multiplier = multiplier
        self.stop_event = stop_event
        self.on_retry = on_retry
        self._sleep = sleep or self._default_sleep

    def _default_sleep(self, seconds: float) -> None:
        if self.stop_event is not None:
            self.stop_event.wait(seconds)
        else:
            time.sleep(seconds)

    def _retrying(self, predicate: Callable[[BaseException], bool],
                  attempts: Optional[int]) -> tenacity.Retrying:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            LOG.debug("control plane call failed (attempt %d): %s", state.attempt_number, exc)
            if self.on_retry is not None and exc is not None:
                self.on_retry(exc, state.attempt_number)

        return backoff.retrying(
            predicate,
            wait=_RetryAfterOrBackoff(backoff.random_exponential(self.multiplier, self.max_wait)),
            attempts=attempts, stop_event=self.stop_event, sleep=self._sleep, before_sleep=before_sleep)

    def call(self, fn: Callable[..., Any], *args: Any, attempts: Optional[int] = -1, **kwargs: Any) -> Any:
        limit = self.attempts if attempts == -1 else attempts
        return self._retrying(is_retryable, limit)(fn, *args, **kwargs)

    # Mirrors ControlPlane's public calls.

    def import_source(self, **kwargs: Any) -> Dict[str, Any]:
        def unused(exc: BaseException) -> bool:
            # never sent, or throttled before the code was looked at: no use of the code consumed
            if isinstance(exc, ThrottledError):
                return True
            return isinstance(exc, ServerUnreachableError) and not getattr(exc, "request_sent", True)

        return self._retrying(unused, self.attempts)(self.inner.import_source, **kwargs)

    def replace_proof(self, old_source_id: str, old_identity: Identity,
                      new_public_key: str) -> Dict[str, str]:
        return self.call(self.inner.replace_proof, old_source_id, old_identity, new_public_key)

    def authenticate(self) -> None:
        self.call(self.inner.authenticate)

    def heartbeat(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        return self.call(self.inner.heartbeat, payload)

    def poll_commands(self, wait: int = 25) -> List[Dict[str, Any]]:
        return self.call(self.inner.poll_commands, wait)

    def ack(self, command_id: str, status: str, **kwargs: Any) -> None:
        self.call(self.inner.ack, command_id, status, **kwargs)

    def get_task(self, task_id: str) -> Dict[str, Any]:
        return self.call(self.inner.get_task, task_id)

    def post_events(self, events: List[Mapping[str, Any]]) -> None:
        self.call(self.inner.post_events, events)

    def close(self) -> None:
        self.inner.close()
