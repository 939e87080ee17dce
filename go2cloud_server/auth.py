"""Authentication: the operator's admin token and the agents' Ed25519 challenge/response.

* Admin token: random, created at first start in ``<data-dir>/admin.token`` (0600). Operator
  requests carry it as ``Authorization: Bearer <token>``.
* Agents (docs/protocol.md, "Token"): the server hands out a single-use nonce valid for 60 s; the
  agent signs ``b"go2cloud-token-v1\\n" + source_id + b"\\n" + nonce`` with the private key whose
  public half it sent at import, and gets a random bearer token valid for 900 s. Nonces and tokens
  live in memory only: after a server restart agents simply authenticate again.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

# the admin token's file and its reading: admintoken (the operator commands read it without
# importing this module)
from go2cloud_server.admintoken import ADMIN_TOKEN_FILE as ADMIN_TOKEN_FILE
from go2cloud_server.admintoken import read_admin_token as read_admin_token
from go2cloud_server.errors import AuthFailed, InvalidInput, TokenExpired

# cryptography is imported where signatures are checked: the operator commands read the admin
# token through this module and must start fast (docs/performance.md, issue 16)
if TYPE_CHECKING:  # pragma: no cover - types only
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

NONCE_TTL_S = 60
TOKEN_TTL_S = 900
SIGNATURE_DOMAIN = b"go2cloud-token-v1\n"
#: what a re-importing agent signs with its old key to have its old source replaced
REPLACE_DOMAIN = b"go2cloud-replace-v1\n"
_EXPIRED_MEMORY_S = 3600


def ensure_admin_token(data_dir: Path) -> str:
    """Return the admin token, creating ``<data-dir>/admin.token`` (0600) the first time."""
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="ascii").strip()
        if token:
            return token
    from go2cloud_server.atomicfile import write_atomic

    token = secrets.token_urlsafe(32)
    write_atomic(path, token + "\n", mode=0o600)
    log.info("created admin token in %s", path)
    return token


def bearer(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_admin(header: Optional[str], admin_token: str) -> None:
    token = bearer(header)
    if token is None or not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise AuthFailed(
            "missing or wrong admin token: use the token in <data-dir>/admin.token (or GO2CLOUD_ADMIN_TOKEN)"
        )


def decode_public_key(text: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidInput("public_key: must be base64 of a 32-byte Ed25519 public key") from None
    if len(raw) != 32:
        raise InvalidInput("public_key: must be base64 of a 32-byte Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)


def signed_message(source_id: str, nonce: str) -> bytes:
    return SIGNATURE_DOMAIN + source_id.encode("utf-8") + b"\n" + nonce.encode("ascii")


def replace_message(old_source_id: str, new_public_key_b64: str, nonce: str) -> bytes:
    """The bytes an agent signs with the old source's key to have it replaced by the source of
    ``new_public_key_b64`` (docs/protocol.md, Import): bound to both keys and a single-use nonce."""
    return (
        REPLACE_DOMAIN
        + old_source_id.encode("utf-8")
        + b"\n"
        + new_public_key_b64.encode("ascii")
        + b"\n"
        + nonce.encode("ascii")
    )


class AgentAuth:
    """Nonces and bearer tokens of agents, in memory. ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._nonces: Dict[str, Tuple[str, float]] = {}
        self._tokens: Dict[str, Tuple[str, float]] = {}

    def challenge(self, source_id: str) -> Dict[str, object]:
        nonce = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        with self._lock:
            self._purge()
            self._nonces[nonce] = (source_id, self._clock() + NONCE_TTL_S)
        return {"nonce": nonce, "expires_in": NONCE_TTL_S}

    def issue_token(
        self, source_id: str, public_key_b64: str, nonce: object, signature: object
    ) -> Dict[str, object]:
        from cryptography.exceptions import InvalidSignature

        if not isinstance(nonce, str) or not isinstance(signature, str):
            raise InvalidInput("nonce and signature: are required base64 strings")
        with self._lock:
            entry = self._nonces.pop(nonce, None)  # single use, even when the signature is bad
        if entry is None or entry[0] != source_id or entry[1] < self._clock():
            raise AuthFailed("unknown, used or expired nonce: request a new challenge")
        try:
            sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise AuthFailed("bad signature") from None
        try:
            decode_public_key(public_key_b64).verify(sig, signed_message(source_id, nonce))
        except (InvalidSignature, InvalidInput):
            raise AuthFailed("bad signature") from None
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (source_id, self._clock() + TOKEN_TTL_S)
        return {"token": token, "expires_in": TOKEN_TTL_S}

    def check_replacement(
        self, old_source_id: str, old_public_key_b64: str, new_public_key_b64: str, proof: object
    ) -> Optional[str]:
        """None when ``proof`` (``{"nonce", "signature"}``) is a signature by the old source's key
        over :func:`replace_message` with a nonce issued for the old source (single use, even when
        the signature is bad), else why not (for the log; never sent to the importer)."""
        from cryptography.exceptions import InvalidSignature

        if proof is None:
            return "no proof of its key was sent"
        nonce = proof.get("nonce") if isinstance(proof, dict) else None
        signature = proof.get("signature") if isinstance(proof, dict) else None
        if not isinstance(nonce, str) or not isinstance(signature, str) or len(signature) > 256:
            return "the proof of its key is malformed"
        with self._lock:
            entry = self._nonces.pop(nonce, None)
        if entry is None or entry[0] != old_source_id or entry[1] < self._clock():
            return "the proof's nonce is unknown, used, expired or was issued for another source"
        try:
            sig = base64.b64decode(signature, validate=True)
            decode_public_key(old_public_key_b64).verify(
                sig, replace_message(old_source_id, new_public_key_b64, nonce)
            )
        except (binascii.Error, ValueError, InvalidSignature, InvalidInput):
            return "the proof's signature was not made by its key for this import"
        return None

    def check(self, header: Optional[str], source_id: str) -> None:
        token = bearer(header)
        if token is None:
            raise AuthFailed("missing bearer token: authenticate with challenge/token first")
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or not hmac.compare_digest(entry[0], source_id):
            raise AuthFailed("unknown bearer token")
        if entry[1] < self._clock():
            raise TokenExpired("bearer token expired: authenticate again")

    def revoke_source(self, source_id: str) -> None:
        with self._lock:
            for token in [t for t, (s, _) in self._tokens.items() if s == source_id]:
                del self._tokens[token]

    def _purge(self) -> None:
        now = self._clock()
        for nonce in [n for n, (_, exp) in self._nonces.items() if exp < now]:
            del self._nonces[nonce]
        for token in [t for t, (_, exp) in self._tokens.items() if exp + _EXPIRED_MEMORY_S < now]:
            del self._tokens[token]
