from __future__ import annotations

import json
import logging

import pytest
import requests
import responses

from go2cloud_client import errors
from go2cloud_client.api import MAX_RESPONSE_BYTES, ControlPlane, RetryingControlPlane
from go2cloud_client.identity import Identity, verify_token_signature

S = "https://cp.example:8443"
API = S + "/api/v1"
SID = "s-abc123"
TOKEN_CODE = "SECRET-token-code-xyz"
BEARER = "bearer-secret-123"

IMPORT_OK = {"source_id": SID, "workgroup": {"id": "wg-1", "name": "wg"}, "heartbeat_interval": 10,
             "server_time": "2026-01-01T00:00:00Z", "server_time_epoch": 1.0}


def do_import(cp):
    return cp.import_source(token_id="at-1", token_code=TOKEN_CODE, public_key="pk",
                            inventory={"hostname": "h"})


def err(status, code, message="m"):
    return {"status": status, "json": {"error": {"code": code, "message": message}}}


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        yield r


@pytest.fixture
def ident():
    return Identity.generate()


def authed(ident):
    return ControlPlane(S, source_id=SID, identity=ident)


def add_token_flow(rsps, ident, token=BEARER):
    rsps.add(responses.POST, f"{API}/sources/{SID}/challenge", json={"nonce": "bm9uY2U=", "expires_in": 60})

    def token_cb(request):
        body = json.loads(request.body)
        assert verify_token_signature(ident.public_key_b64, SID, "bm9uY2U=", body["signature"])
        return 200, {}, json.dumps({"token": token, "expires_in": 900})

    rsps.add_callback(responses.POST, f"{API}/sources/{SID}/token", callback=token_cb)


def test_import_success_sends_protocol_body(rsps):
    rsps.add(responses.POST, f"{API}/sources/import", json=IMPORT_OK, status=201)
    doc = do_import(ControlPlane(S))
    assert doc["source_id"] == SID and doc["workgroup"]["name"] == "wg"
    body = json.loads(rsps.calls[0].request.body)
    assert body["token_code"] == TOKEN_CODE and body["previous_source_id"] is None
    assert TOKEN_CODE not in rsps.calls[0].request.url


@pytest.mark.parametrize("status,code,etype,exit_code", [
    (403, "code_unknown", errors.CodeUnknownError, 20),
    (403, "code_expired", errors.CodeExpiredError, 21),
    (403, "code_exhausted", errors.CodeExhaustedError, 22),
    (403, "code_revoked", errors.CodeRevokedError, 23),
    (422, "import_rejected", errors.ImportRejectedError, 24),
    (400, "invalid_request", errors.RequestRejectedError, 14),
    (413, "too_large", errors.RequestRejectedError, 14),
    (500, "internal_error", errors.ServerError, 13),
    (502, "", errors.ServerError, 13),
])
def test_import_errors_map_to_types(rsps, status, code, etype, exit_code):
    rsps.add(responses.POST, f"{API}/sources/import", **err(status, code, "the server says no"))
    with pytest.raises(etype) as e:
        do_import(ControlPlane(S))
    assert e.value.exit_code == exit_code
    if code.startswith("code_"):
        assert "the server says no" in str(e.value)


@pytest.mark.parametrize("kwargs,match", [
    ({"body": b"not json{"}, "not valid JSON"),
    ({"json": ["a"]}, "not a JSON object"),
    ({"json": {"workgroup": {"id": "w", "name": "n"}}}, "'source_id'"),
    ({"json": {**IMPORT_OK, "source_id": 5}}, "'source_id'"),
    ({"json": {**IMPORT_OK, "source_id": "../../x"}}, "'source_id'"),
    ({"json": {**IMPORT_OK, "workgroup": {"id": "w"}}}, "'name'"),
    ({"json": {**IMPORT_OK, "heartbeat_interval": True}}, "'heartbeat_interval'"),
])
def test_malformed_import_response_is_protocol_error(rsps, kwargs, match):
    rsps.add(responses.POST, f"{API}/sources/import", status=201, **kwargs)
    with pytest.raises(errors.ProtocolError, match=match) as e:
        do_import(ControlPlane(S))
    assert e.value.exit_code == 12


def test_oversized_response_is_protocol_error(rsps):
    big = b'{"x": "' + b"a" * (MAX_RESPONSE_BYTES + 10) + b'"}'
    rsps.add(responses.POST, f"{API}/sources/import", body=big, status=201)
    with pytest.raises(errors.ProtocolError, match="too large|larger than"):
        do_import(ControlPlane(S))


def test_unreachable_names_url_and_what_to_check(rsps):
    rsps.add(responses.POST, f"{API}/sources/import",
             body=requests.exceptions.ConnectionError("Failed to establish a new connection: refused"))
    with pytest.raises(errors.ServerUnreachableError) as e:
        do_import(ControlPlane(S))
    assert S in str(e.value) and "firewall" in str(e.value)
    assert e.value.exit_code == 10
    assert e.value.request_sent is False


def test_tls_failure_is_tls_error(rsps):
    rsps.add(responses.POST, f"{API}/sources/import",
             body=requests.exceptions.SSLError("Fingerprints did not match. Expected x, got y"))
    with pytest.raises(errors.TLSError, match="pinned fingerprint") as e:
        do_import(ControlPlane(S, fingerprint="sha256:" + "0" * 64))
    assert e.value.exit_code == 11


def test_plain_http_to_non_loopback_refused():
    with pytest.raises(errors.UsageError, match="https"):
        ControlPlane("http://cp.example:8080")
    ControlPlane("http://127.0.0.1:8080")


def test_token_then_bearer_on_heartbeat(rsps, ident):
    add_token_flow(rsps, ident)
    rsps.add(responses.POST, f"{API}/sources/{SID}/heartbeat",
             json={"server_time_epoch": 5.0, "commands_waiting": False, "heartbeat_interval": 10},
             match=[responses.matchers.header_matcher({"Authorization": f"Bearer {BEARER}"})])
    assert authed(ident).heartbeat({"state": "idle"})["server_time_epoch"] == 5.0


def test_401_gets_new_token_once_and_retries(rsps, ident):
    add_token_flow(rsps, ident)
    rsps.add(responses.GET, f"{API}/sources/{SID}/commands", **err(401, "token_expired"))
    rsps.add(responses.GET, f"{API}/sources/{SID}/commands",
             json={"commands": [{"id": "c-1", "type": "pause", "params": {"task_id": "t-1"}}]})
    cmds = authed(ident).poll_commands(wait=0)
    assert [c["id"] for c in cmds] == ["c-1"]
    paths = [c.request.path_url.split("?")[0] for c in rsps.calls]
    assert paths.count(f"/api/v1/sources/{SID}/token") == 2


def test_401_twice_is_identity_rejected(rsps, ident):
    add_token_flow(rsps, ident)
    rsps.add(responses.GET, f"{API}/sources/{SID}/commands", **err(401, "unauthorized"))
    with pytest.raises(errors.IdentityRejectedError) as e:
        authed(ident).poll_commands(wait=0)
    assert e.value.exit_code == 25


@pytest.mark.parametrize("status,code", [(404, "source_unknown"), (410, "source_replaced")])
def test_deleted_or_replaced_source(rsps, ident, status, code):
    add_token_flow(rsps, ident)
    rsps.add(responses.POST, f"{API}/sources/{SID}/heartbeat", **err(status, code))
    with pytest.raises(errors.IdentityRejectedError, match="--abort"):
        authed(ident).heartbeat({})


def test_commands_without_usable_id_are_skipped_once_and_the_others_kept(rsps, ident, caplog):
    add_token_flow(rsps, ident)
    kept = [{"id": "c-1", "type": 42, "params": None}, {"id": "c-2", "type": "pause", "params": [1]}]
    batch = {"commands": [{"id": "../x", "type": "pause", "params": {}}, "junk", {"type": "pause"}, *kept]}
    rsps.add(responses.GET, f"{API}/sources/{SID}/commands", json=batch)
    rsps.add(responses.GET, f"{API}/sources/{SID}/commands", json=batch)
    cp = authed(ident)
    for _ in range(2):  # delivered again: still skipped, not logged again
        cmds = cp.poll_commands(wait=0)
        # type and params are the command layer's to reject (it acknowledges them)
        assert cmds == [dict(kept[0], params={}), kept[1]]
    skipped = [r.getMessage() for r in caplog.records if "without a usable id" in r.getMessage()]
    assert len(skipped) == 3 and "('../x')" in skipped[0] and "('junk')" in skipped[1]


def test_secrets_never_logged(rsps, ident, caplog):
    caplog.set_level(logging.DEBUG)
    rsps.add(responses.POST, f"{API}/sources/import", **err(403, "code_unknown"))
    with pytest.raises(errors.CodeUnknownError) as e:
        do_import(ControlPlane(S))
    assert TOKEN_CODE not in str(e.value)
    add_token_flow(rsps, ident)
    rsps.add(responses.POST, f"{API}/sources/{SID}/commands/c-1", json={})
    authed(ident).ack("c-1", "succeeded", result={"target": {"password": "pw-secret"}})
    text = caplog.text
    for secret in (TOKEN_CODE, BEARER, "pw-secret"):
        assert secret not in text
    assert "/sources/import" in text  # requests are logged, their bodies are not


# -- retry wrapper ---------------------------------------------------------------------------


class FlakyCP:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    def heartbeat(self, payload):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {"ok": True}

    def import_source(self, **kw):
        return self.heartbeat(kw)


def test_retryable_errors_are_retried_with_capped_backoff():
    sleeps = []
    inner = FlakyCP([errors.ServerUnreachableError("down"), errors.ServerError("500"),
                     errors.ProtocolError("bad")])
    seen = []
    rcp = RetryingControlPlane(inner, attempts=5, max_wait=30, sleep=sleeps.append,
                               on_retry=lambda exc, n: seen.append(n))
    assert rcp.heartbeat({}) == {"ok": True}
    assert inner.calls == 4 and len(sleeps) == 3 and seen == [1, 2, 3]
    assert all(0 <= s <= 30 for s in sleeps)


def test_retry_gives_up_after_attempts():
    inner = FlakyCP([errors.ServerUnreachableError("down")] * 10)
    rcp = RetryingControlPlane(inner, attempts=3, sleep=lambda s: None)
    with pytest.raises(errors.ServerUnreachableError):
        rcp.heartbeat({})
    assert inner.calls == 3


@pytest.mark.parametrize("exc", [errors.CodeUnknownError("x"), errors.IdentityRejectedError("x"),
                                 errors.RequestRejectedError("x"), errors.TLSError("x")])
def test_permanent_errors_are_not_retried(exc):
    inner = FlakyCP([exc])
    rcp = RetryingControlPlane(inner, attempts=5, sleep=lambda s: pytest.fail("slept"))
    with pytest.raises(type(exc)):
        rcp.heartbeat({})
    assert inner.calls == 1


def test_import_retried_only_when_request_never_reached_the_server():
    unsent = errors.ServerUnreachableError("refused")
    unsent.request_sent = False
    sent = errors.ServerUnreachableError("read timeout")
    sent.request_sent = True
    inner = FlakyCP([unsent, sent])
    rcp = RetryingControlPlane(inner, attempts=5, sleep=lambda s: None)
    with pytest.raises(errors.ServerUnreachableError, match="read timeout"):
        rcp.import_source(token_id="x")
    assert inner.calls == 2


def test_wait_strategy_is_jittered_exponential_capped():
    import tenacity

    rcp = RetryingControlPlane(FlakyCP([]), attempts=5)
    wait = rcp._retrying(lambda e: True, 5).wait.backoff  # unless the server said Retry-After
    assert isinstance(wait, tenacity.wait_random_exponential)
    assert wait.max == 30


def test_a_response_cut_in_the_middle_is_reported_as_a_cut_connection_not_as_bad_json():
    """A connection cut mid-response (no Content-Length to notice it by) must say so and be
    retried, not be blamed on the control plane as "not valid JSON" (issue 17, item 7)."""
    from go2cloud_client.api import ControlPlane as _CP
    from go2cloud_client.errors import ProtocolError as _PE
    from go2cloud_client.errors import ServerUnreachableError as _SU

    with pytest.raises(_SU, match="ended in the middle"):
        _CP._decode(b'{"commands": [{"id": "c-1", "ty', "commands")
    with pytest.raises(_PE, match="not valid JSON"):
        _CP._decode(b'{"commands": ]', "commands")


# -- several control-plane URLs (replicas) ------------------------------------------------------

S2 = "https://cp2.example:8443"
API2 = S2 + "/api/v1"


def test_an_agent_with_two_urls_moves_to_the_replica_it_can_reach(rsps, ident, caplog):
    """The first replica refuses connections: the retried heartbeat goes to the second, which
    gets a token of its own (the first replica's is not valid there), and stays there."""
    rsps.add(responses.POST, f"{API}/sources/{SID}/challenge",
             body=requests.exceptions.ConnectionError("Failed to establish a new connection: refused"))
    rsps.add(responses.POST, f"{API2}/sources/{SID}/challenge", json={"nonce": "bm9uY2U=", "expires_in": 60})
    rsps.add(responses.POST, f"{API2}/sources/{SID}/token", json={"token": BEARER, "expires_in": 900})
    rsps.add(responses.POST, f"{API2}/sources/{SID}/heartbeat",
             json={"server_time": "2026-01-01T00:00:00Z", "server_time_epoch": 1.0, "commands_waiting": False,
                   "heartbeat_interval": 10})
    cp = ControlPlane(f"{S},{S2}", source_id=SID, identity=ident)
    assert cp.servers == [S, S2] and cp.server == S
    retrying = RetryingControlPlane(cp, attempts=3, sleep=lambda s: None)
    with caplog.at_level(logging.WARNING):
        assert retrying.heartbeat({"agent_version": "x"})["commands_waiting"] is False
    assert cp.server == S2
    assert f"the control plane at {S} cannot be reached: trying {S2}" in caplog.text
    assert [c.request.url.split("/api")[0] for c in rsps.calls] == [S, S2, S2, S2]
    assert rsps.calls[-1].request.headers["Authorization"] == f"Bearer {BEARER}"
    retrying.heartbeat({})  # no more failover: the second replica answers
    assert cp.server == S2 and len(rsps.calls) == 5


def test_one_url_never_moves(rsps, ident):
    rsps.add(responses.POST, f"{API}/sources/{SID}/challenge",
             body=requests.exceptions.ConnectionError("Failed to establish a new connection: refused"))
    cp = ControlPlane(S, source_id=SID, identity=ident)
    with pytest.raises(errors.ServerUnreachableError, match=S):
        cp.heartbeat({})
    assert cp.servers == [S] and cp.server == S
