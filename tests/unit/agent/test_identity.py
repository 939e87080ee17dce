from __future__ import annotations

import base64
import os
import stat

from go2cloud_client.identity import Identity, token_challenge_message, verify_token_signature


def test_sign_and_verify_token_challenge():
    ident = Identity.generate()
    assert len(base64.b64decode(ident.public_key_b64)) == 32
    sig = ident.sign_token_challenge("s-abc", "bm9uY2U=")
    assert verify_token_signature(ident.public_key_b64, "s-abc", "bm9uY2U=", sig)
    assert not verify_token_signature(ident.public_key_b64, "s-abd", "bm9uY2U=", sig)
    assert not verify_token_signature(Identity.generate().public_key_b64, "s-abc", "bm9uY2U=", sig)
    assert token_challenge_message("s-abc", "n") == b"go2cloud-token-v1\ns-abc\nn"


def test_save_load_private(home):
    assert Identity.load(home) is None
    ident = Identity.generate()
    ident.save(home)
    assert stat.S_IMODE(os.stat(home.key_file).st_mode) == 0o600
    assert Identity.load(home).public_key_b64 == ident.public_key_b64
    assert Identity.delete(home) and Identity.load(home) is None
