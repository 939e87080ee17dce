"""Connections to a control plane pinned by the SHA-256 fingerprint of its certificate: the
server package's one pinning helper (the operator client of ``go2cloud_server`` subcommands, and
the tests and benchmarks that talk to a server).

With a fingerprint, CA and host-name checks are replaced by the pin (urllib3 compares the
SHA-256 of the peer's certificate with it before a request is sent); without one, TLS is
verified normally against the system CAs. The fingerprint of a certificate file is
:func:`go2cloud_server.tls.fingerprint`.
"""

from __future__ import annotations

from typing import Any, Optional

import requests
from requests.adapters import HTTPAdapter

from go2cloud_server.errors import InvalidInput


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


def pinned_session(fingerprint: Optional[str]) -> requests.Session:
    """A session whose https:// connections accept only the certificate of ``fingerprint``
    (normal TLS verification when it is empty)."""
    session = requests.Session()
    if fingerprint:
        session.mount("https://", PinnedAdapter(fingerprint))
        session.verify = False  # the pin replaces CA verification (urllib3 still checks the fingerprint)
    return session
