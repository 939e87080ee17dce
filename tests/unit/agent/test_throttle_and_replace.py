"""The agent obeys 429/503 + Retry-After, and proves the old key when it imports again after
``--abort`` (docs/protocol.md, Import)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import responses
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from go2cloud_client import api as api_mod
from go2cloud_client import cli as cli_mod
from go2cloud_client import errors, lifecycle
from go2cloud_client.api import RETRY_AFTER_MAX_S, ControlPlane, RetryingControlPlane
from go2cloud_client.config import load_config
from go2cloud_client.console import Console
from go2cloud_client.identity import Identity, replace_message

S = "https://cp.example:8443"
API = S + "/api/v1"
OLD = "s-old1"
IMPORT_OK = {"source_id": "s-new1", "workgroup": {"id": "wg-1", "name": "wg"}, "heartbeat_interval": 10,
             "server_time": "2026-01-01T00:00:00Z", "server_time_epoch": 1.0}


def throttled(status=429, code="rate_limited", retry_after="7"):
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return {"status": status, "headers": headers,
            "json": {"error": {"code": code, "message": "too many failed imports: wait"}}}


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


@pytest.fixture
def slept(monkeypatch):
    waits: list = []
    monkeypatch.setattr(api_mod.time, "sleep", waits.append)
    return waits


def _import(cp):
    return cp.import_source(token_id="at-1", token_code="code", public_key="pk", inventory={"hostname": "h"})


def test_429_is_a_throttled_error_with_retry_after(rsps):
    rsps.add(responses.POST, f"{API}/sources/import", **throttled())
    with pytest.raises(errors.ThrottledError) as info:
        _import(ControlPlane(S))
    assert info.value.retry_after == 7 and info.value.exit_code == 15 and info.value.retryable


@pytest.mark.parametrize("status,code", [(429, "rate_limited"), (503, "server_busy")])
def test_import_waits_retry_after_then_retries(rsps, slept, status, code):
    rsps.add(responses.POST, f"{API}/sources/import", **throttled(status, code))
    rsps.add(responses.POST, f"{API}/sources/import", json=IMPORT_OK, status=201)
    doc = _import(RetryingControlPlane(ControlPlane(S), attempts=3, max_wait=5))
    assert doc["source_id"] == "s-new1"
    assert slept == [7.0]  # the server's Retry-After, not the 5 s backoff cap
    assert len(rsps.calls) == 2


def test_retry_after_is_bounded_and_attempts_end(rsps, slept):
    for _ in range(3):
        rsps.add(responses.POST, f"{API}/sources/import", **throttled(retry_after="999999"))
    with pytest.raises(errors.ThrottledError):
        _import(RetryingControlPlane(ControlPlane(S), attempts=3, max_wait=5))
    assert slept == [RETRY_AFTER_MAX_S, RETRY_AFTER_MAX_S] and len(rsps.calls) == 3


def test_wrong_code_after_throttling_is_not_retried(rsps, slept):
    rsps.add(responses.POST, f"{API}/sources/import", **throttled(retry_after="1"))
    rsps.add(responses.POST, f"{API}/sources/import", status=403,
             json={"error": {"code": "code_unknown", "message": "unknown activation code"}})
    with pytest.raises(errors.CodeUnknownError):
        _import(RetryingControlPlane(ControlPlane(S), attempts=5, max_wait=5))
    assert slept == [1.0] and len(rsps.calls) == 2


def test_heartbeat_obeys_retry_after_too(rsps, slept):
    ident = Identity.generate()
    rsps.add(responses.POST, f"{API}/sources/s-1/challenge", json={"nonce": "bm9uY2U=", "expires_in": 60})
    rsps.add(responses.POST, f"{API}/sources/s-1/token", json={"token": "t", "expires_in": 900})
    rsps.add(responses.POST, f"{API}/sources/s-1/heartbeat", **throttled(503, "server_busy", "3"))
    rsps.add(responses.POST, f"{API}/sources/s-1/heartbeat", json={"server_time_epoch": 1.0})
    RetryingControlPlane(ControlPlane(S, source_id="s-1", identity=ident), attempts=3).heartbeat({})
    assert slept == [3.0]


def _config(home):
    return load_config(home, environ={}, flags={"server": S})


@pytest.fixture
def no_inventory(monkeypatch):
    monkeypatch.setattr(lifecycle, "collect", lambda home, caps=None: {"hostname": "h", "machine_id": "m"})


def test_foreground_import_tells_the_operator_it_waits(home, rsps, slept, no_inventory):
    rsps.add(responses.POST, f"{API}/sources/import", **throttled(retry_after="4"))
    rsps.add(responses.POST, f"{API}/sources/import", json=IMPORT_OK, status=201)
    out = io.StringIO()
    source = lifecycle.import_source(home, _config(home), Console(out), token_id="at-1", token_code="c")
    assert source["source_id"] == "s-new1" and slept == [4.0]
    assert "throttling imports" in out.getvalue() and "retrying in 4 s" in out.getvalue()


def test_foreground_import_gives_up_with_a_clear_message(home, rsps, slept, no_inventory):
    for _ in range(3):
        rsps.add(responses.POST, f"{API}/sources/import", **throttled(retry_after="2"))
    with pytest.raises(errors.ThrottledError, match="wait a few minutes, check the token id"):
        lifecycle.import_source(home, _config(home), Console(io.StringIO()), token_id="at-1", token_code="c")
    assert not home.key_file.exists()


def _abort_imported(home, capsys):
    old = Identity.generate()
    old.save(home)
    home.write_state(home.source_file, {"source_id": OLD, "server": S})
    assert cli_mod.run(["--home", str(home.root), "--abort"]) == 0
    capsys.readouterr()
    return old


def test_abort_keeps_the_key_until_the_next_import_proves_it(home, rsps, capsys, no_inventory):
    old = _abort_imported(home, capsys)
    assert not home.key_file.exists() and home.previous_key_file.exists()
    assert oct(home.previous_key_file.stat().st_mode & 0o777) == "0o600"
    rsps.add(responses.POST, f"{API}/sources/{OLD}/challenge", json={"nonce": "bm9uY2U=", "expires_in": 60})
    seen: dict = {}

    def import_cb(request):
        seen.update(json.loads(request.body))
        return 201, {}, json.dumps({**IMPORT_OK, "replaced_source_id": OLD})

    rsps.add_callback(responses.POST, f"{API}/sources/import", callback=import_cb)
    out = io.StringIO()
    source = lifecycle.import_source(home, _config(home), Console(out), token_id="at-1", token_code="c")
    assert seen["previous_source_id"] == OLD
    proof = seen["previous_source_proof"]
    assert proof["nonce"] == "bm9uY2U="
    Ed25519PublicKey.from_public_bytes(old.public_key_raw).verify(
        base64.b64decode(proof["signature"]), replace_message(OLD, seen["public_key"], "bm9uY2U="))
    assert source["replaced_source_id"] == OLD and "not marked replaced" not in out.getvalue()
    assert not home.previous_key_file.exists() and home.previous_source_id() is None
    assert Identity.load(home).public_key_b64 == seen["public_key"]  # the new key, not the old one


def test_import_says_when_the_old_source_was_not_replaced(home, rsps, capsys, no_inventory):
    _abort_imported(home, capsys)
    rsps.add(responses.POST, f"{API}/sources/{OLD}/challenge", status=410,
             json={"error": {"code": "source_replaced", "message": "replaced"}})
    rsps.add(responses.POST, f"{API}/sources/import", json={**IMPORT_OK, "replaced_source_id": None},
             status=201)
    out = io.StringIO()
    lifecycle.import_source(home, _config(home), Console(out), token_id="at-1", token_code="c")
    body = json.loads(rsps.calls[-1].request.body)
    assert body["previous_source_id"] == OLD and body["previous_source_proof"] is None
    assert f"go2cloud_server source replace {OLD} --by s-new1" in out.getvalue()
    assert not home.previous_key_file.exists()


def test_failed_import_keeps_the_old_key_for_the_next_try(home, rsps, capsys, no_inventory):
    _abort_imported(home, capsys)
    rsps.add(responses.POST, f"{API}/sources/{OLD}/challenge", json={"nonce": "bm9uY2U=", "expires_in": 60})
    rsps.add(responses.POST, f"{API}/sources/import", status=403,
             json={"error": {"code": "code_unknown", "message": "unknown activation code"}})
    with pytest.raises(errors.CodeUnknownError):
        lifecycle.import_source(home, _config(home), Console(io.StringIO()), token_id="at-1", token_code="c")
    assert home.previous_key_file.exists() and home.previous_source_id() == OLD
