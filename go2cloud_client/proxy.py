"""The agent's HTTP(S) proxy: one setting for every channel (the control-plane API, block data,
file-level data).

Where it comes from (first found wins): ``--proxy URL``, ``GO2CLOUD_PROXY``, ``proxy:`` in
config.yaml, and at import the standard ``https_proxy``/``HTTPS_PROXY`` (then ``all_proxy``)
environment; ``no_proxy`` the same way (``--no-proxy``, ``GO2CLOUD_NO_PROXY``, ``no_proxy:``,
``no_proxy``/``NO_PROXY``). The import records the effective setting in ``source.json`` so the
agent keeps it across restarts, and ``service install`` writes it into the service's
environment. ``none`` turns a proxy from the environment off.

How it is used: an ``http://[user:password@]HOST:PORT`` proxy, asked with ``CONNECT host:port``
for every connection (Basic ``Proxy-Authorization`` when the URL has credentials); TLS then runs
end to end between the agent and the control plane or target through the tunnel, so the pinned
certificate is checked on the server's own certificate exactly as without a proxy (a proxy that
inspects TLS fails the pin). A proxy that refuses (407, 403, ...) is a :class:`ProxyRefusedError`
naming the proxy and what to do. Credentials never appear in argv, logs or messages
(:attr:`ProxyURL.display`).
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Mapping, Optional
from urllib.parse import quote, unquote, urlsplit

from go2cloud_client.errors import ProxyRefusedError

#: the explicit "no proxy" value (overrides a proxy from the environment)
NONE = "none"
#: biggest CONNECT answer head read from a proxy
MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class ProxyURL:
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def display(self) -> str:
        """The proxy's address for messages and logs (never the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The full URL (with credentials): for ``requests`` and the tunnel's environment only."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        return f"http://{auth}{host}:{self.port}"

    def authorization(self) -> Optional[str]:
        """The ``Proxy-Authorization`` header value, or None without credentials."""
        if not (self.username or self.password):
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_proxy_url(value: str) -> ProxyURL:
    """``http://[user:password@]HOST[:PORT]`` (default port 80); ValueError with the reason."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text  # what curl and requests accept: HOST:PORT
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError("must be an http:// proxy URL (http://[user:password@]HOST:PORT); HTTPS "
                         "traffic is tunnelled through it with CONNECT")
    if not parts.hostname:
        raise ValueError("has no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be http://[user:password@]HOST:PORT with no path or query")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    return ProxyURL(parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or ""))


def validate_setting(value: str) -> str:
    """Config validator of ``proxy``: a proxy URL or ``none``."""
    if value.strip().lower() == NONE:
        return NONE
    parse_proxy_url(value)
    return value.strip()


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``host`` matches a NO_PROXY list (names, .suffixes, *, IPs and CIDRs)."""
    host = host.strip("[]").lower()
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        entry = entry.split(":")[0] if entry.count(":") == 1 else entry
        suffix = entry if entry.startswith(".") else "." + entry
        if host == entry.lstrip(".") or host.endswith(suffix):
            return True
    return False


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


def from_standard_env(environ: Mapping[str, str]) -> tuple[str, str]:
    """(proxy, no_proxy) of the standard variables (``https_proxy`` then ``all_proxy``); ""
    when unset. ``http_proxy`` is not used: every channel of the agent is HTTPS."""
    return (_env(environ, "https_proxy") or _env(environ, "all_proxy"), _env(environ, "no_proxy"))


@dataclass(frozen=True)
class ProxySettings:
    """The effective setting: ``proxy`` is a URL, or "" for direct connections."""

    proxy: str = ""
    no_proxy: str = ""

    @classmethod
    def of(cls, proxy: Optional[str], no_proxy: Optional[str]) -> ProxySettings:
        value = (proxy or "").strip()
        return cls("" if value.lower() == NONE else value, (no_proxy or "").strip())

    def for_host(self, host: str) -> Optional[ProxyURL]:
        """The proxy to use for a connection to ``host``, or None (no proxy, or ``host`` is in
        no_proxy)."""
        if not self.proxy or bypasses_proxy(host, self.no_proxy):
            return None
        return parse_proxy_url(self.proxy)

    def for_url(self, url: str) -> Optional[ProxyURL]:
        return self.for_host(urlsplit(url).hostname or "")

    def describe(self) -> str:
        if not self.proxy:
            return "direct (no proxy)"
        text = f"through the proxy {parse_proxy_url(self.proxy).display}"
        return text + (f" (not for {self.no_proxy})" if self.no_proxy else "")


def refused(proxy: ProxyURL, target: str, status: int, reason: str) -> ProxyRefusedError:
    """The error for a proxy that answered CONNECT with ``status``."""
    if status in (401, 407):  # 407 by the standard; some proxies (tinyproxy) answer wrong ones with 401
        what = ("the proxy asks for credentials and none were given: put them in the proxy URL "
                "(http://USER:PASSWORD@HOST:PORT in --proxy, GO2CLOUD_PROXY or proxy: in config.yaml)"
                if not (proxy.username or proxy.password) else
                "the proxy refused the user name and password of the proxy URL: check them with the "
                "proxy's administrator and set them again (--proxy, GO2CLOUD_PROXY or proxy: in config.yaml)")
    elif status == 403:
        what = (f"the proxy does not allow CONNECT to {target}: ask its administrator to allow "
                f"CONNECT to {target}, or add the host to no_proxy if it is reachable directly")
    else:
        what = ("check the proxy, or add the host to no_proxy if it is reachable directly")
    return ProxyRefusedError(
        f"the proxy {proxy.display} refused the connection to {target} (HTTP {status} "
        f"{reason.strip()[:80]}): {what}", status=status)


def connect_via_proxy(proxy: ProxyURL, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` tunnelled through ``proxy`` with CONNECT (TLS is then
    done by the caller over it, end to end). ProxyRefusedError when the proxy answers anything
    but 2xx; OSError when the proxy cannot be reached (the message names the proxy)."""
    try:
        sock = socket.create_connection((proxy.host, proxy.port), timeout=timeout)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot reach the proxy {proxy.display}: {exc.strerror or exc}") from None
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        auth = proxy.authorization()
        if auth:
            lines.append(f"Proxy-Authorization: {auth}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            if len(head) > MAX_HEAD:
                raise OSError(f"the proxy {proxy.display} sent an oversized answer to CONNECT")
            # one byte at a time: nothing after the head may be consumed (it is the server's TLS)
            data = sock.recv(1)
            if not data:
                raise OSError(f"the proxy {proxy.display} closed the connection before answering CONNECT")
            head += data
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        try:
            _, code, *rest = status_line.split(" ", 2)
            status = int(code)
        except ValueError:
            raise OSError(f"the proxy {proxy.display} answered {status_line[:80]!r}, not HTTP") from None
        if not 200 <= status < 300:
            raise refused(proxy, target, status, rest[0] if rest else "")
        return sock
    except BaseException:
        sock.close()
        raise


def settings_at_import(proxy: Optional[str], no_proxy: Optional[str],
                       environ: Mapping[str, str]) -> ProxySettings:
    """The setting an import records: the configured one (flag, GO2CLOUD_*, config.yaml), else
    the standard environment."""
    env_proxy, env_no_proxy = from_standard_env(environ)
    return ProxySettings.of(proxy or env_proxy, no_proxy or env_no_proxy)


def settings_of(proxy: Optional[str], no_proxy: Optional[str], source: Mapping[str, object]) -> ProxySettings:
    """The setting a running agent uses: the configured one, else what the import recorded."""
    return ProxySettings.of(proxy or str(source.get("proxy") or ""),
                            no_proxy if no_proxy is not None else str(source.get("no_proxy") or ""))
