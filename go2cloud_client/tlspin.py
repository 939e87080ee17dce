"""TLS to the control plane's own certificate, pinned by its SHA-256 fingerprint (and the
checks of addresses and fingerprints that go with it): the one pinning implementation of the
agent, used by the control-plane client (:func:`https_adapter`), the block transport and the rsync
tunnel (:func:`client_context`, :func:`check_pin`). Imported by the rsync tunnel, so it stays free
of the agent's heavier modules (``requests`` is imported only by :func:`https_adapter`).

With a fingerprint the context skips CA and host-name checks (the pin replaces them) and
:func:`check_pin` compares the SHA-256 of the peer's certificate with the pin before a byte of
a request is sent (the requests adapter has urllib3 do the same with ``assert_fingerprint``).
Without a fingerprint the system CAs and the host name are checked.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import ssl
from functools import cache
from typing import Any, Optional, Tuple

_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_canonical_fingerprint(value: Any) -> bool:
    """``sha256:`` + 64 lowercase hex digits exactly (the form on the wire, nothing normalized)."""
    return isinstance(value, str) and bool(_FINGERPRINT_RE.match(value))


def normalize_fingerprint(value: str) -> str:
    """``sha256:`` + 64 hex digits (colons allowed, case-insensitive) -> canonical form."""
    text = value.strip().lower()
    if not text.startswith("sha256:"):
        raise ValueError("must look like sha256:<64 hex digits>")
    text = "sha256:" + text[len("sha256:"):].replace(":", "")
    if not _FINGERPRINT_RE.match(text):
        raise ValueError("must look like sha256:<64 hex digits>")
    return text


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PinMismatch(ssl.SSLError):
    """The peer's certificate is not the pinned one (never retried)."""


def client_context(fingerprint: str) -> Tuple[ssl.SSLContext, Optional[bytes]]:
    """(context, pin) for a connection to a peer identified by ``fingerprint`` (``sha256:HEX``);
    pin is None (CA and host-name checks) when the fingerprint is empty."""
    if fingerprint:
        fp = normalize_fingerprint(fingerprint)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin, checked on every connect, replaces CA checks
        pin: Optional[bytes] = bytes.fromhex(fp[len("sha256:"):])
    else:
        ctx = ssl.create_default_context()
        pin = None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx, pin


def check_pin(sock: Any, pin: Optional[bytes]) -> None:
    """Raise :class:`PinMismatch` unless the peer's certificate hashes to ``pin`` (``sock``: an
    ``ssl.SSLSocket``, or anything with its ``getpeercert``)."""
    if pin is None:
        return
    der = sock.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).digest(), pin):
        raise PinMismatch("the peer's certificate does not match the pinned fingerprint")


@cache
def _pinned_adapter_class() -> Any:
    from requests.adapters import HTTPAdapter  # here, not at the top: the tunnel never needs it

    class PinnedAdapter(HTTPAdapter):
        """An adapter whose connections accept exactly the certificate with this SHA-256
        fingerprint (urllib3 ``assert_fingerprint``); CA and host-name checks are replaced by the
        pin."""

        def __init__(self, fingerprint_hex: str) -> None:
            self._fingerprint_hex = fingerprint_hex
            super().__init__(max_retries=0)

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["assert_fingerprint"] = self._fingerprint_hex
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            # requests builds the proxy's pool manager apart from init_poolmanager's: without this
            # the tunnelled connections would skip the pin (and, verify being off, every check)
            proxy_kwargs["assert_fingerprint"] = self._fingerprint_hex
            return super().proxy_manager_for(proxy, **proxy_kwargs)

        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            # The pin replaces CA verification. Forced here because requests lets
            # REQUESTS_CA_BUNDLE override a session-level verify=False; urllib3 marks pinned
            # connections verified.
            kwargs["verify"] = False
            return super().send(request, **kwargs)

    return PinnedAdapter


def https_adapter(fingerprint: Optional[str] = None) -> Any:
    """A ``requests`` transport adapter for ``https://`` (no retries of its own: the callers own
    their retry policy): pinned to ``fingerprint`` (``sha256:HEX``, any accepted spelling), or
    with the system CAs and host-name checks when it is empty."""
    if fingerprint:
        return _pinned_adapter_class()(normalize_fingerprint(fingerprint)[len("sha256:"):])
    from requests.adapters import HTTPAdapter

    return HTTPAdapter(max_retries=0)
