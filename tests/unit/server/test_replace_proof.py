"""Replacing a source needs proof of its key or an operator (docs/protocol.md, Import; DESIGN 7)."""

from __future__ import annotations

import base64

import pytest

from go2cloud_server import auth
from go2cloud_server.errors import Conflict, InvalidInput, SourceInUse
from tests.unit.server.conftest import import_body, inventory, new_key, replace_proof


@pytest.fixture
def world(service):
    """Workgroup A with a source (key known to the test) that has a running task; workgroup B."""
    service.create_workgroup({"name": "wg-a"})
    service.create_workgroup({"name": "wg-b"})
    key, pub = new_key()
    code_a = service.create_code("wg-a", {"uses": 10})
    sid = service.import_source(import_body(code_a, public_key=pub, inventory=inventory(machine_id="m-a")))[
        "source_id"
    ]
    service.start_migration({"drill": False}, source=sid)
    return {"key": key, "sid": sid, "code_a": code_a, "code_b": service.create_code("wg-b", {"uses": 10})}


def _import(service, code, previous, proof=None, pub=None, machine_id="m-a"):
    pub = pub or new_key()[1]
    return service.import_source(
        import_body(code, public_key=pub, previous_source_id=previous, previous_source_proof=proof,
                    inventory=inventory(machine_id=machine_id))
    )


def _untouched(service, sid):
    assert service.agent_source(sid)["state"] == "active"
    assert service.source_migration(sid)["tasks"][0]["status"] == "syncing"


def _refusal_event(service, new_sid):
    events = service.show_source(new_sid)["events"]
    return [e for e in events if e["code"] == "replace_refused"]


def test_code_holder_of_another_workgroup_cannot_replace(service, world):
    doc = _import(service, world["code_b"], world["sid"])
    assert doc["replaced_source_id"] is None and doc["workgroup"]["name"] == "wg-b"
    _untouched(service, world["sid"])
    [event] = _refusal_event(service, doc["source_id"])
    assert event["level"] == "warning" and "another workgroup" in event["message"]


def test_even_with_the_old_key_a_code_of_another_workgroup_does_not_replace(service, world):
    _, pub = new_key()
    proof = replace_proof(service, world["key"], world["sid"], pub)
    doc = _import(service, world["code_b"], world["sid"], proof, pub)
    assert doc["replaced_source_id"] is None
    _untouched(service, world["sid"])


def test_no_proof_forged_or_misbound_proofs_do_not_replace(service, world):
    sid = world["sid"]
    forger, _ = new_key()
    _, pub = new_key()
    _, other_pub = new_key()
    nonce = service.agent_auth.challenge(sid)["nonce"]
    token_sig = world["key"].sign(auth.signed_message(sid, nonce))  # a token signature, not a replacement
    cases = {
        "none": None,
        "malformed": {"nonce": 1, "signature": []},
        "forged": replace_proof(service, forger, sid, pub),
        "for another key": replace_proof(service, world["key"], sid, other_pub),
        "token domain": {"nonce": nonce, "signature": base64.b64encode(token_sig).decode()},
        "made-up nonce": {
            "nonce": base64.b64encode(b"x" * 32).decode(),
            "signature": base64.b64encode(world["key"].sign(auth.replace_message(sid, pub, "eHg="))).decode(),
        },
    }
    for name, proof in cases.items():
        doc = _import(service, world["code_a"], sid, proof, pub if name != "none" else None)
        assert doc["replaced_source_id"] is None, name
        assert _refusal_event(service, doc["source_id"]), name
        _untouched(service, sid)


def test_a_proof_is_single_use_and_expires(service, world, monkeypatch):
    sid = world["sid"]
    _, pub = new_key()
    proof = replace_proof(service, world["key"], sid, pub)
    # replayed: the first use consumed the nonce (here by an import that was refused for its machine id)
    refused = _import(service, world["code_a"], sid, proof, pub, machine_id="m-other")
    assert refused["replaced_source_id"] is None
    assert _import(service, world["code_a"], sid, proof, pub)["replaced_source_id"] is None
    _untouched(service, sid)
    # expired: a nonce older than NONCE_TTL_S
    proof = replace_proof(service, world["key"], sid, pub)
    real = service.agent_auth._clock
    monkeypatch.setattr(service.agent_auth, "_clock", lambda: real() + auth.NONCE_TTL_S + 1)
    assert _import(service, world["code_a"], sid, proof, pub)["replaced_source_id"] is None
    _untouched(service, sid)


def test_valid_proof_from_the_same_workgroup_replaces(service, world, rsyncd):
    sid = world["sid"]
    tid = service.source_migration(sid)["tasks"][0]["task_id"]
    _, pub = new_key()
    doc = _import(service, world["code_a"], sid, replace_proof(service, world["key"], sid, pub), pub)
    assert doc["replaced_source_id"] == sid
    assert service.show_source(sid)["replaced_by"] == doc["source_id"]
    assert service.source_migration(sid)["tasks"][0]["status"] == "cancelled"
    assert rsyncd.closed == [tid]  # the task's rsync session is ended
    assert [e["code"] for e in service.show_source(doc["source_id"])["events"]] == ["source_replaced"]


def test_source_in_no_workgroup_is_replaced_only_by_an_operator(service, world):
    service.create_workgroup({"name": "wg-c"})
    key, pub = new_key()
    code = service.create_code("wg-c", {"uses": 5})
    loose = _import(service, code, None, pub=pub, machine_id="m-c")["source_id"]
    service.disassociate(loose)
    _, new_pub = new_key()
    proof = replace_proof(service, key, loose, new_pub)
    doc = _import(service, code, loose, proof, new_pub, machine_id="m-c")
    assert doc["replaced_source_id"] is None
    assert "only an operator" in _refusal_event(service, doc["source_id"])[0]["message"]
    view = service.replace_source(loose, {"by": doc["source_id"]})
    assert view["status"] == "replaced" and view["replaced_by"] == doc["source_id"]


def test_operator_replace(service, world, rsyncd):
    sid = world["sid"]
    tid = service.source_migration(sid)["tasks"][0]["task_id"]
    other = _import(service, world["code_b"], None, machine_id="m-b")["source_id"]
    with pytest.raises(Conflict, match="associate it first"):
        service.replace_source(sid, {"by": other})  # another workgroup
    _untouched(service, sid)
    with pytest.raises(InvalidInput):
        service.replace_source(sid, {"by": sid})
    with pytest.raises(InvalidInput):
        service.replace_source(sid, {})
    new = _import(service, world["code_a"], None)["source_id"]
    view = service.replace_source(sid, {"by": new})
    assert view["status"] == "replaced" and view["replaced_by"] == new
    assert service.source_migration(sid)["tasks"][0]["status"] == "cancelled"
    assert rsyncd.closed == [tid]  # the task's rsync session is ended
    with pytest.raises(Conflict, match="already replaced"):
        service.replace_source(sid, {"by": new})


def test_a_made_up_previous_id_reaches_the_operator_escaped(service, world):
    doc = _import(service, world["code_a"], "s-x\x1b]0;pwned\x07\x1b[2J")
    [event] = _refusal_event(service, doc["source_id"])
    assert "\x1b" not in event["message"] and "\x07" not in event["message"]
    assert "no such source" in event["message"]


# -- a source whose agent runs (a live session lease, fencing) is not replaced ------------------


def _session(service, sid, instance="p-1"):
    return service.open_session(sid, {"session_id": "home-1", "instance": instance,
                                      "fingerprint": {"machine_id": "m-a"}})


def test_operator_replace_of_a_source_with_a_running_agent_is_refused(service, world, clock):
    sid = world["sid"]
    _session(service, sid)
    new = _import(service, world["code_a"], None, machine_id="m-a")["source_id"]
    with pytest.raises(SourceInUse) as err:
        service.replace_source(sid, {"by": new})
    message = str(err.value)
    assert f"source {sid} not replaced" in message and "its agent is running" in message, message
    assert "Stop that agent" in message and "wait for its lease to expire" in message, message
    assert err.value.http_status == 409 and err.value.code == "source_in_use"
    _untouched(service, sid)
    # the agent stops (no more heartbeats): once its lease expired the replacement goes ahead
    clock.advance(service.lease_ttl + 1)
    assert service.replace_source(sid, {"by": new})["replaced_by"] == new


def test_import_does_not_replace_a_source_whose_agent_renews_its_lease(service, world, clock):
    import threading

    sid = world["sid"]
    service.replace_watch_s = 1.0
    _session(service, sid)
    stop = threading.Event()

    def heartbeats():  # the running agent: its heartbeats renew the lease while the import watches
        while not stop.wait(0.2):
            clock.advance(1)
            service.fence(sid, "p-1", renew_lease=True)

    t = threading.Thread(target=heartbeats, daemon=True)
    t.start()
    try:
        _, pub = new_key()
        doc = _import(service, world["code_a"], sid, replace_proof(service, world["key"], sid, pub), pub)
    finally:
        stop.set()
        t.join()
    assert doc["replaced_source_id"] is None
    _untouched(service, sid)
    [event] = _refusal_event(service, doc["source_id"])
    assert "its agent is running" in event["message"] and "Stop that agent" in event["message"], event


def test_import_right_after_the_agent_stopped_replaces_it(service, world):
    """``--abort`` then import again at once: the lease is still live but no longer renewed."""
    sid = world["sid"]
    service.replace_watch_s = 0.5
    _session(service, sid)
    _, pub = new_key()
    doc = _import(service, world["code_a"], sid, replace_proof(service, world["key"], sid, pub), pub)
    assert doc["replaced_source_id"] == sid
