"""TLS to the control plane's own certificate, pinned by its SHA-256 fingerprint (and the
checks of addresses and fingerprints that go with it; imported by the rsync tunnel, so it stays
free of the agent's heavier modules).

With a fingerprint the context skips CA and host-name checks (the pin replaces them) and
:func:`check_pin` compares the SHA-256 of the peer's certificate with the pin before a byte of
a request is sent. Without a fingerprint the system CAs and the host name are checked.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import ssl
from typing import Any, Optional, Tuple

_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


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
