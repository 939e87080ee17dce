"""How the operator client finds, pins and authenticates to the server (no connection here:
tests/integration/test_operator_client.py talks to a real one)."""

from __future__ import annotations

import json

import pytest

from go2cloud_server import tls
from go2cloud_server.errors import AuthFailed, InvalidInput, ServerUnreachable
from go2cloud_server.opclient import Endpoint, OperatorClient, resolve

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64


def _server_json(data_dir, **info):
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "server.json").write_text(json.dumps(info))


def test_the_pin_is_the_flag_else_the_certificate_file_else_server_json(tmp_path, monkeypatch):
    monkeypatch.delenv("GO2CLOUD_ADMIN_TOKEN", raising=False)
    _server_json(tmp_path, url="https://127.0.0.1:8443/", fingerprint=FP_B)
    (tmp_path / "admin.token").write_text("tok\n")
    assert resolve(tmp_path, None, None) == Endpoint("https://127.0.0.1:8443", FP_B, "tok")
    cert, _ = tls.ensure_certificate(tmp_path / "tls", ["127.0.0.1"])
    assert resolve(tmp_path, None, None).fingerprint == tls.fingerprint(cert) != FP_B
    assert resolve(tmp_path, None, FP_A.upper().replace("SHA256", "sha256")).fingerprint == FP_A
    monkeypatch.setenv("GO2CLOUD_ADMIN_TOKEN", " from-env ")
    assert resolve(tmp_path, "https://cp.example:9443", None) == Endpoint(
        "https://cp.example:9443", tls.fingerprint(cert), "from-env")


def test_no_server_no_token_and_bad_urls_are_errors_that_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("GO2CLOUD_ADMIN_TOKEN", raising=False)
    with pytest.raises(ServerUnreachable, match="no server found: .*server.json does not exist"):
        resolve(tmp_path, None, None)
    for url in ("ftp://cp", "cp.example:8443"):
        with pytest.raises(InvalidInput, match="must start with https://"):
            resolve(tmp_path, url, FP_A)
    for url in ("https://", "https://:8443", "https://cp:99999", "https://cp:0", "https://cp:port"):
        with pytest.raises(InvalidInput, match=r"expected https://HOST or https://HOST:PORT"):
            resolve(tmp_path, url, FP_A)
    with pytest.raises(InvalidInput, match="--server-fingerprint"):
        resolve(tmp_path, "https://cp", "sha256:12")
    endpoint = resolve(tmp_path, "https://[::1]:8443", FP_A)
    assert endpoint.admin_token is None
    with pytest.raises(AuthFailed, match="no admin token"):  # before any connection (the fence)
        OperatorClient(endpoint).request("GET", "/sources")


def test_path_segments_are_escaped():
    assert OperatorClient.seg("東京/a b?#") == "%E6%9D%B1%E4%BA%AC%2Fa%20b%3F%23"
