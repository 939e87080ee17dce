"""Connections to a control plane pinned by the SHA-256 fingerprint of its certificate: the
server package's one pinning helper (the operator client of ``go2cloud_server`` subcommands, and
the tests and benchmarks that talk to a server).

A fingerprint is ``sha256:`` + the lowercase hex of SHA-256 over the certificate's DER encoding
(:func:`fingerprint_der`; of a PEM file: :func:`pem_fingerprint`). With a fingerprint, CA and
host-name checks are replaced by the pin: :func:`check_pin` compares the SHA-256 of the peer's
certificate with it after the handshake and before a byte of a request is sent (the requests
session of :func:`pinned_session` has urllib3 do the same with ``assert_fingerprint``). Without
one, TLS is verified normally against the system CAs, host name included.

Only the standard library is imported here, and ``ssl`` only when a context is made: the
operator commands import this module, and their start-up time is measured
(docs/performance.md, "Issue 16: operator command start-up"). ``requests`` is imported by
:func:`pinned_session` and :class:`PinnedAdapter` only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from go2cloud_server.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover - types only
    import ssl

    import requests

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)


def normalise_fingerprint(value: str) -> str:
    """``sha256:`` + 64 hex digits (``sha256:`` optional, colons allowed, any case) -> canonical
    form; InvalidInput naming ``--server-fingerprint`` otherwise."""
    text = value.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    text = text.replace(":", "")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InvalidInput(f"--server-fingerprint {value!r}: expected sha256: followed by 64 hex digits")
    return "sha256:" + text


def fingerprint_der(der: bytes) -> str:
    """``sha256:<hex>`` of a DER-encoded certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def pem_fingerprint(cert_path: Path) -> str:
    """``sha256:<hex>`` of the DER encoding of the first certificate in the PEM file
    ``cert_path`` (a chain's first certificate is the server's own). ValueError when the file
    holds no PEM certificate."""
    data = Path(cert_path).read_bytes()
    found = _PEM_CERTIFICATE.search(data)
    if found is None:
        raise ValueError(f"{cert_path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    try:
        der = base64.b64decode(b"".join(found.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{cert_path}: the PEM certificate is not valid base64") from None
    return fingerprint_der(der)


def client_context(fingerprint: Optional[str]) -> ssl.SSLContext:
    """A client context for a server identified by ``fingerprint``: no CA or host-name checks
    (:func:`check_pin` replaces them, call it on every connection), or the system CAs and host
    name when ``fingerprint`` is empty. TLS 1.2 at least."""
    import ssl

    if fingerprint:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin, checked on every connection, replaces CA checks
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_pin(sock: Any, fingerprint: Optional[str]) -> bool:
    """Whether the peer of ``sock`` (an ``ssl.SSLSocket`` after its handshake) presented the
    certificate of ``fingerprint`` (always true without a fingerprint: the context checked the
    CAs and the host name)."""
    if not fingerprint:
        return True
    pin = bytes.fromhex(normalise_fingerprint(fingerprint).split(":", 1)[1])
    der = sock.getpeercert(binary_form=True) or b""
    return hmac.compare_digest(hashlib.sha256(der).digest(), pin)


def _pinned_adapter_class() -> Any:
    cached = globals().get("PinnedAdapter")
    if cached is not None:
        return cached
    from requests.adapters import HTTPAdapter

    class PinnedAdapter(HTTPAdapter):
        """Accepts exactly the certificate whose SHA-256 fingerprint is ``fingerprint``."""

        def __init__(self, fingerprint: str, **kwargs: Any) -> None:
            self._fingerprint = normalise_fingerprint(fingerprint).split(":", 1)[1]
            super().__init__(**kwargs)

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["assert_fingerprint"] = self._fingerprint
            kwargs["assert_hostname"] = False
            kwargs["cert_reqs"] = "CERT_NONE"
            super().init_poolmanager(*args, **kwargs)

    globals()["PinnedAdapter"] = PinnedAdapter
    return PinnedAdapter


def __getattr__(name: str) -> Any:
    """``PinnedAdapter``: the requests transport adapter that accepts exactly one certificate
    (``PinnedAdapter(fingerprint)``), built on first use so that importing this module does not
    import requests."""
    if name == "PinnedAdapter":
        return _pinned_adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pinned_session(fingerprint: Optional[str]) -> requests.Session:
    """A requests session whose https:// connections accept only the certificate of
    ``fingerprint`` (normal TLS verification when it is empty): for the tests and benchmarks
    that talk to a server with requests."""
    import requests

    session = requests.Session()
    if fingerprint:
        session.mount("https://", _pinned_adapter_class()(fingerprint))
        session.verify = False  # the pin replaces CA verification (urllib3 still checks the fingerprint)
    return session
