from __future__ import annotations

import base64
import stat

import pytest

from go2cloud_server import auth
from go2cloud_server.errors import AuthFailed, InvalidInput, TokenExpired
from tests.unit.server.conftest import new_key


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _sign(key, source_id: str, nonce: str) -> str:
    return base64.b64encode(key.sign(auth.signed_message(source_id, nonce))).decode()


def test_admin_token_created_once_with_mode_0600(tmp_path):
    token = auth.ensure_admin_token(tmp_path)
    path = tmp_path / auth.ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40
    assert auth.ensure_admin_token(tmp_path) == token
    auth.check_admin(f"Bearer {token}", token)
    for header in (None, "", f"Basic {token}", "Bearer wrong", f"Bearer {token}x"):
        with pytest.raises(AuthFailed):
            auth.check_admin(header, token)


def test_admin_token_env_overrides_file(tmp_path, monkeypatch):
    auth.ensure_admin_token(tmp_path)
    monkeypatch.setenv("GO2CLOUD_ADMIN_TOKEN", "from-env")
    assert auth.read_admin_token(tmp_path) == "from-env"


def test_challenge_token_roundtrip_and_single_use_nonce():
    key, pub = new_key()
    a = auth.AgentAuth(clock=Mono())
    ch = a.challenge("s-1")
    assert ch["expires_in"] == 60 and len(base64.b64decode(ch["nonce"])) == 32
    tok = a.issue_token("s-1", pub, ch["nonce"], _sign(key, "s-1", ch["nonce"]))
    assert tok["expires_in"] == 900
    a.check(f"Bearer {tok['token']}", "s-1")
    with pytest.raises(AuthFailed, match="nonce"):
        a.issue_token("s-1", pub, ch["nonce"], _sign(key, "s-1", ch["nonce"]))
    with pytest.raises(AuthFailed):
        a.check(f"Bearer {tok['token']}", "s-2")  # a token is bound to its source


def test_bad_signature_and_wrong_key_and_expired_nonce():
    key, pub = new_key()
    other, _ = new_key()
    clock = Mono()
    a = auth.AgentAuth(clock=clock)
    ch = a.challenge("s-1")
    with pytest.raises(AuthFailed, match="signature"):
        a.issue_token("s-1", pub, ch["nonce"], _sign(other, "s-1", ch["nonce"]))
    ch = a.challenge("s-1")
    with pytest.raises(AuthFailed, match="signature"):  # signed for another source id
        a.issue_token("s-1", pub, ch["nonce"], _sign(key, "s-2", ch["nonce"]))
    ch = a.challenge("s-1")
    clock.t += 61
    with pytest.raises(AuthFailed, match="expired"):
        a.issue_token("s-1", pub, ch["nonce"], _sign(key, "s-1", ch["nonce"]))
    ch = a.challenge("s-1")
    with pytest.raises(AuthFailed):  # nonce of another source
        a.issue_token("s-2", pub, ch["nonce"], _sign(key, "s-2", ch["nonce"]))
    with pytest.raises(InvalidInput):
        a.issue_token("s-1", pub, None, "x")


def test_token_expires_after_900s():
    key, pub = new_key()
    clock = Mono()
    a = auth.AgentAuth(clock=clock)
    ch = a.challenge("s-1")
    token = a.issue_token("s-1", pub, ch["nonce"], _sign(key, "s-1", ch["nonce"]))["token"]
    clock.t += 899
    a.check(f"Bearer {token}", "s-1")
    clock.t += 2
    with pytest.raises(TokenExpired):
        a.check(f"Bearer {token}", "s-1")
    with pytest.raises(AuthFailed) as err:
        a.check(None, "s-1")
    assert err.value.code == "unauthorized"


def test_public_key_must_be_32_raw_bytes():
    with pytest.raises(InvalidInput):
        auth.decode_public_key("not base64!")
    with pytest.raises(InvalidInput):
        auth.decode_public_key(base64.b64encode(b"x" * 31).decode())
