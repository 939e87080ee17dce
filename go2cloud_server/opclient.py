"""Operator HTTP client of the control plane API (used by ``go2cloud_server`` subcommands).

Finding the server: ``--server URL`` (env ``GO2CLOUD_SERVER``), else ``<data-dir>/server.json``
written by ``serve``. Pinning: ``--server-fingerprint sha256:HEX``, else the fingerprint of
``<data-dir>/tls/cert.pem``, else the one in ``server.json``; without any, TLS is verified normally.
Authentication: the admin token from ``GO2CLOUD_ADMIN_TOKEN`` or ``<data-dir>/admin.token``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional
from urllib.parse import quote

import requests

from go2cloud_server import auth, tls
from go2cloud_server.errors import BY_CODE, AuthFailed, InvalidInput, ServerError, ServerUnreachable
from go2cloud_server.tlspin import normalise_fingerprint, pinned_session

log = logging.getLogger(__name__)

MAX_RESPONSE = 16 * 1024 * 1024


@dataclass
class Endpoint:
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
    pin = None
    if fingerprint:
        pin = normalise_fingerprint(fingerprint)
    else:
        cert = tls.paths(data_dir / "tls")[0]
        if cert.exists():
            pin = tls.fingerprint(cert)
        elif info.get("fingerprint"):
            pin = normalise_fingerprint(str(info["fingerprint"]))
    return Endpoint(url=url.rstrip("/"), fingerprint=pin, admin_token=auth.read_admin_token(data_dir))


class OperatorClient:
    def __init__(self, endpoint: Endpoint, timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.session = pinned_session(endpoint.fingerprint)

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
        url = self.endpoint.url + "/api/v1" + path
        headers = {"Authorization": f"Bearer {self.endpoint.admin_token}", "Accept": "application/json"}
        try:
            # verify is passed per request: REQUESTS_CA_BUNDLE would otherwise override session.verify
            resp = self.session.request(
                method,
                url,
                json=body,
                params=params,
                headers=headers,
                timeout=self.timeout,
                stream=True,
                verify=self.session.verify,
            )
        except requests.exceptions.SSLError as exc:
            raise ServerUnreachable(
                f"TLS to {self.endpoint.url} failed ({_short(exc)}): check --server-fingerprint "
                "or the certificate in <data-dir>/tls/"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnreachable(
                f"cannot reach the server at {self.endpoint.url} ({_short(exc)}): is "
                "'go2cloud_server serve' running?"
            ) from None
        try:
            raw = resp.raw.read(MAX_RESPONSE + 1, decode_content=True)
        except requests.exceptions.RequestException as exc:
            raise ServerUnreachable(f"connection to {self.endpoint.url} broke: {_short(exc)}") from None
        finally:
            resp.close()
        if len(raw) > MAX_RESPONSE:
            raise ServerError("the server's answer is too large")
        try:
            data = json.loads(raw.decode("utf-8")) if raw else {}
        except (UnicodeDecodeError, ValueError):
            raise ServerError(
                f"the server answered {resp.status_code} with a body that is not JSON"
            ) from None
        if resp.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            cls = BY_CODE.get(str(code), ServerError)
            raise cls(str(message or f"HTTP {resp.status_code}"), code=str(code) if code else None)
        return data


def _short(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error chain."""
    text = str(exc)
    if "Fingerprints did not match" in text:
        return "the certificate's fingerprint does not match the pinned one"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "certificate verification failed"
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    return text[:200]
