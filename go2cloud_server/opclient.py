"""Operator HTTP client of the control plane API (used by ``go2cloud_server`` subcommands).

Finding the server: ``--server URL`` (env ``GO2CLOUD_SERVER``), else ``<data-dir>/server.json``
written by ``serve``. Pinning: ``--server-fingerprint sha256:HEX``, else the fingerprint of
``<data-dir>/tls/cert.pem``, else the one in ``server.json``; without any, TLS is verified normally
(system CAs and host name). Authentication: the admin token from ``GO2CLOUD_ADMIN_TOKEN`` or
``<data-dir>/admin.token``. A proxy in ``https_proxy`` / ``all_proxy`` (``http_proxy`` for an
``http://`` server) is used with CONNECT unless ``no_proxy`` names the server's host.

One request, one connection (``http.client`` and ``ssl`` of the standard library): an operator
command makes one or two calls, and its start-up time is what the operator waits for
(docs/performance.md, "Issue 16: operator command start-up"), so neither requests nor
cryptography is imported here. The pin is checked after the TLS handshake and before a byte of
the request (the admin token) is sent.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple
from urllib.parse import quote, unquote, urlencode, urlsplit

from go2cloud_server import __version__
from go2cloud_server.admintoken import read_admin_token
from go2cloud_server.errors import BY_CODE, AuthFailed, InvalidInput, ServerError, ServerUnreachable
from go2cloud_server.tlspin import check_pin, client_context, normalise_fingerprint, pem_fingerprint

MAX_RESPONSE = 16 * 1024 * 1024
#: the certificate ``serve`` writes, relative to the data directory (``tls.paths()``; that module
#: is not imported here because it needs cryptography)
CERT_FILE = Path("tls") / "cert.pem"


class Endpoint(NamedTuple):
    """Where the server is (``url``), its pin (``sha256:HEX``, None: CA checks) and the admin
    token (None: not found)."""

    url: str
    fingerprint: Optional[str]
    admin_token: Optional[str]


def resolve(data_dir: Path, server: Optional[str], fingerprint: Optional[str]) -> Endpoint:
    """Where the server is and how to trust and authenticate to it (see the module docstring)."""
    data_dir = Path(data_dir)
    info: Dict[str, Any] = {}
    info_file = data_dir / "server.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    url = server or info.get("url")
    if not url:
        raise ServerUnreachable(
            f"no server found: {info_file} does not exist; start 'go2cloud_server serve' "
            "or pass --server URL (or set GO2CLOUD_SERVER)"
        )
    if not url.startswith(("https://", "http://")):
        raise InvalidInput(f"--server {url!r}: must start with https://")
    try:
        valid = bool(urlsplit(url).hostname) and urlsplit(url).port != 0
    except ValueError:  # a port that is not a number from 0 to 65535
        valid = False
    if not valid:
        raise InvalidInput(f"--server {url!r}: expected https://HOST or https://HOST:PORT (a host name or "
                           "address; a port from 1 to 65535)")
    pin = None
    if fingerprint:
        pin = normalise_fingerprint(fingerprint)
    else:
        cert = data_dir / CERT_FILE
        if cert.exists():
            pin = pem_fingerprint(cert)
        elif info.get("fingerprint"):
            pin = normalise_fingerprint(str(info["fingerprint"]))
    return Endpoint(url=url.rstrip("/"), fingerprint=pin, admin_token=read_admin_token(data_dir))


class OperatorClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._context: Optional[ssl.SSLContext] = None

    @staticmethod
    def seg(value: str) -> str:
        return quote(value, safe="")

    def request(
        self, method: str, path: str, body: Any = None, params: Optional[Dict[str, Any]] = None
    ) -> Any:
        if not self.endpoint.admin_token:
            raise AuthFailed(
                "no admin token: run on the server machine with --data-dir (or GO2CLOUD_DATA_DIR), "
                "or set GO2CLOUD_ADMIN_TOKEN"
            )
        parts = urlsplit(self.endpoint.url)
        target = parts.path + "/api/v1" + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            target += "?" + urlencode(query)
        headers = {
            "Authorization": f"Bearer {self.endpoint.admin_token}",
            "Accept": "application/json",
            "User-Agent": f"go2cloud_server/{__version__} (operator)",
            "Connection": "close",
        }
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn = None
        try:
            try:
                conn, proxy_headers = self._connect(parts)
                if proxy_headers is not None:  # plain HTTP through a proxy: the absolute form
                    headers.update(proxy_headers)
                    target = f"{parts.scheme}://{parts.netloc}{target}"
                conn.request(method, target, body=data, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLError as exc:
                raise ServerUnreachable(
                    f"TLS to {self.endpoint.url} failed ({_short(exc)}): check --server-fingerprint "
                    "or the certificate in <data-dir>/tls/"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(
                    f"cannot reach the server at {self.endpoint.url} ({_short(exc)}): is "
                    "'go2cloud_server serve' running?"
                ) from None
            try:
                raw = resp.read(MAX_RESPONSE + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(f"connection to {self.endpoint.url} broke: {_short(exc)}") from None
        finally:
            if conn is not None:
                conn.close()
        if len(raw) > MAX_RESPONSE:
            raise ServerError("the server's answer is too large")
        try:
            answer = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, ValueError):
            raise ServerError(f"the server answered {resp.status} with a body that is not JSON") from None
        if resp.status >= 400:
            err = answer.get("error") if isinstance(answer, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            cls = BY_CODE.get(str(code), ServerError)
            raise cls(str(message or f"HTTP {resp.status}"), code=str(code) if code else None)
        return answer

    def _connect(self, parts: Any) -> Tuple[http.client.HTTPConnection, Optional[Dict[str, str]]]:
        """An open connection to the server, through the proxy if one applies: for https the
        TLS handshake is done and the pin checked (ssl.SSLError when the certificate is not the
        pinned one). The second value is the proxy's headers when requests go to a proxy in
        absolute form (plain HTTP through a proxy), else None."""
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = _proxy_for(parts.scheme, host)
        conn: http.client.HTTPConnection
        if parts.scheme != "https":
            if proxy is None:
                return http.client.HTTPConnection(host, port, timeout=self.timeout), None
            return http.client.HTTPConnection(proxy[0], proxy[1], timeout=self.timeout), proxy[2]
        if self._context is None:
            self._context = client_context(self.endpoint.fingerprint)
        if proxy is None:
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context)
        else:
            conn = http.client.HTTPSConnection(proxy[0], proxy[1], timeout=self.timeout,
                                               context=self._context)
            conn.set_tunnel(host, port, headers=proxy[2])
        try:
            conn.connect()
            if not check_pin(conn.sock, self.endpoint.fingerprint):
                raise ssl.SSLError(PIN_MISMATCH)
        except BaseException:
            conn.close()  # the socket of a failed handshake too (the harness's client lives long)
            raise
        return conn, None


#: what a connection to a server with another certificate than the pinned one says
PIN_MISMATCH = "the certificate's fingerprint does not match the pinned one"


def _proxy_for(scheme: str, host: str) -> Optional[Tuple[str, int, Dict[str, str]]]:
    """(host, port, headers) of the proxy for ``scheme``://``host`` from the environment
    (``https_proxy`` or ``http_proxy``, else ``all_proxy``; ``no_proxy`` excludes hosts), or
    None. Credentials in the proxy URL become a ``Proxy-Authorization`` header."""
    if not any(k.lower() in ("https_proxy", "http_proxy", "all_proxy") for k in os.environ):
        return None
    import urllib.request  # only with a proxy set: it is slow to import

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
        host, proxies
    ):
        return None
    if "://" not in url:
        url = "http://" + url
    proxy = urlsplit(url)
    if proxy.scheme != "http" or not proxy.hostname:
        raise InvalidInput(
            f"proxy {proxy.scheme}://{proxy.hostname or ''} (from {scheme}_proxy or all_proxy): only an "
            "http:// proxy is supported; fix the variable, or name the server's host in no_proxy"
        )
    headers: Dict[str, str] = {}
    if proxy.username is not None:
        import base64

        creds = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(creds).decode("ascii")
    return proxy.hostname, proxy.port or 80, headers


def _short(exc: BaseException) -> str:
    """The useful part of a connection error."""
    text = str(exc)
    if PIN_MISMATCH in text:
        return PIN_MISMATCH
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verification failed"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    return text[:200] or exc.__class__.__name__
