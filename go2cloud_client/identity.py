"""The agent's key-pair identity (Ed25519).

The private key is generated on the source at import and never leaves it (PKCS#8 PEM, 0600, in
``<home>/identity/``); the control plane stores the public key and issues short-lived bearer
tokens against signed challenges. The activation code is used once at import and never stored.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from go2cloud_client.atomicfile import atomic_rename
from go2cloud_client.errors import ConfigError
from go2cloud_client.home import Home

LOG = logging.getLogger(__name__)

TOKEN_CONTEXT = b"go2cloud-token-v1\n"
REPLACE_CONTEXT = b"go2cloud-replace-v1\n"


def token_challenge_message(source_id: str, nonce_text: str) -> bytes:
    """The bytes signed to get a token (docs/protocol.md, Token)."""
    return TOKEN_CONTEXT + source_id.encode("utf-8") + b"\n" + nonce_text.encode("utf-8")


def replace_message(old_source_id: str, new_public_key_b64: str, nonce_text: str) -> bytes:
    """The bytes signed with the old key to have the old source replaced (docs/protocol.md, Import)."""
    return (REPLACE_CONTEXT + old_source_id.encode("utf-8") + b"\n" + new_public_key_b64.encode("ascii")
            + b"\n" + nonce_text.encode("utf-8"))


class Identity:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, home: Home, path: Optional[Path] = None) -> Optional[Identity]:
        """The stored identity (``path``: another key file of the home), or None when there is none."""
        path = path or home.key_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the agent key {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"the agent key {path} is corrupt; run go2cloud_client --abort and import again"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the agent key {path} is not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_previous(cls, home: Home) -> Optional[Identity]:
        """The key of the aborted import (kept to prove it at the next import), or None; an
        unreadable one is None too (the import then simply does not replace the old source)."""
        try:
            return cls.load(home, home.previous_key_file)
        except ConfigError as exc:
            LOG.warning("the previous agent key is unusable (%s); the old source will not be replaced", exc)
            return None

    @staticmethod
    def retire(home: Home) -> bool:
        """Keep the current key as the previous one (``--abort``): the next import signs with it
        to have the old source replaced, then deletes it."""
        if not home.key_file.exists():
            return False
        try:
            atomic_rename(home.key_file, home.previous_key_file)
        except OSError as exc:
            raise ConfigError(f"cannot move the agent key {home.key_file}: {exc.strerror or exc}") from exc
        return True

    def save(self, home: Home) -> None:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        home.identity_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.write_bytes(home.key_file, pem)

    @staticmethod
    def delete(home: Home) -> bool:
        return home.remove(home.key_file)

    @property
    def public_key_raw(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_raw).decode("ascii")

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_replacement(self, old_source_id: str, new_public_key_b64: str, nonce_text: str) -> str:
        """Base64 signature (with this, the old key) over :func:`replace_message`."""
        return base64.b64encode(self.sign(replace_message(old_source_id, new_public_key_b64, nonce_text))
                                ).decode("ascii")

    def sign_token_challenge(self, source_id: str, nonce_text: str) -> str:
        """Base64 Ed25519 signature over ``b"go2cloud-token-v1\\n" + source_id + b"\\n" + nonce``."""
        return base64.b64encode(self.sign(token_challenge_message(source_id, nonce_text))).decode("ascii")


def verify_token_signature(public_key_b64: str, source_id: str, nonce_text: str, signature_b64: str) -> bool:
    """Check a challenge signature (what the control plane does; used by tests)."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(base64.b64decode(signature_b64, validate=True),
                      token_challenge_message(source_id, nonce_text))
    except (InvalidSignature, ValueError):
        return False
    return True
