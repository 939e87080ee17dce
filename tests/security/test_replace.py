"""Replacing a source needs proof of its key or an operator (DESIGN 7, docs/security.md).

Attackers: the holder of an activation code of another workgroup (or of the same one) who knows
the victim's source id and its world-readable machine id, but not its private key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from go2cloud_server.tlspin import pinned_session
from tests.support.harness import Server, wait_for

pytestmark = pytest.mark.integration

REPLACE = b"go2cloud-replace-v1\n"


def _pub(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _post(server: Server, path: str, body: Any = None) -> requests.Response:
    with pinned_session(server.fingerprint) as s:
        return s.post(server.url + "/api/v1" + path, json=body, timeout=60, verify=False)


def _import(server: Server, code: Dict[str, Any], previous: Optional[str], machine_id: str,
            key: Optional[Ed25519PrivateKey] = None,
            proof: Optional[Dict[str, str]] = None) -> requests.Response:
    body = {
        "token_id": code["token_id"], "token_code": code["token_code"],
        "public_key": _pub(key or Ed25519PrivateKey.generate()), "agent_version": "0.1.0",
        "previous_source_id": previous, "previous_source_proof": proof,
        "inventory": {"hostname": "attacker", "machine_id": machine_id},
    }
    return _post(server, "/sources/import", body)


def _proof(server: Server, signer: Ed25519PrivateKey, old: str, new_pub: str) -> Dict[str, str]:
    nonce = _post(server, f"/sources/{old}/challenge").json()["nonce"]
    sig = signer.sign(REPLACE + old.encode() + b"\n" + new_pub.encode() + b"\n" + nonce.encode())
    return {"nonce": nonce, "signature": base64.b64encode(sig).decode()}


def _sample(root: Path, files: int = 40, size: int = 128 * 1024) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    return root


def _victim(server: Server, agents, tmp_path: Path):
    """A real agent imported into workgroup A with a slow migration running."""
    server.j("workgroup", "create", "wg-a")
    server.j("workgroup", "create", "wg-b")
    agent = agents("victim").start(code=server.new_code("wg-a", uses=3))
    sid = agent.wait_imported()
    src = _sample(tmp_path / "src")
    server.j("migration", "start", "--source", sid, "--path", str(src), "--bandwidth-mbps", "1")
    server.wait_task(sid, "syncing")
    machine_id = server.show_source(sid)["inventory"]["machine_id"]  # world-readable on the host
    assert machine_id
    return agent, sid, machine_id


def _replaced(server: Server, sid: str, by: str):
    proc = server.cli("source", "replace", sid, "--by", by, check=False)
    return server.show_source(sid) if proc.returncode == 0 else None


def _still_running(server: Server, agent, sid: str) -> None:
    shown = server.show_source(sid)
    assert shown["status"] == "syncing" and shown["replaced_by"] is None, shown
    assert shown["task"]["status"] == "syncing"
    assert agent.proc.poll() is None, agent.output()
    seen = shown["last_seen_at"]
    wait_for(lambda: server.show_source(sid)["last_seen_at"] != seen, 15, "another heartbeat")
    assert "replaced" not in agent.output()


def _refused_events(server: Server, new_sid: str) -> list:
    return [e for e in server.show_source(new_sid)["events"] if e["code"] == "replace_refused"]


def test_code_holder_of_another_workgroup_cannot_replace_a_source(server, agents, tmp_path):
    agent, sid, machine_id = _victim(server, agents, tmp_path)
    imported = {}
    for wg in ("wg-b", "wg-a"):  # another workgroup's code, and even a code of the victim's own workgroup
        resp = _import(server, server.new_code(wg, uses=1), sid, machine_id)
        assert resp.status_code == 201, resp.text  # the import itself succeeds, as a new source
        imported[wg] = resp.json()
        assert server.source(sid)["status"] != "replaced"
    _still_running(server, agent, sid)
    for wg, doc in imported.items():
        assert doc.get("replaced_source_id") is None and doc["workgroup"]["name"] == wg
        [event] = _refused_events(server, doc["source_id"])
        assert event["level"] == "warning" and sid in event["message"]


def _not_replaced(server: Server, sid: str, resp: requests.Response) -> None:
    assert resp.status_code == 201, resp.text
    assert server.source(sid)["status"] != "replaced"
    assert resp.json().get("replaced_source_id") is None


def test_forged_or_replayed_proofs_do_not_replace(server, agents, tmp_path):
    agent, sid, machine_id = _victim(server, agents, tmp_path)
    code = server.new_code("wg-a", uses=5)
    forger = Ed25519PrivateKey.generate()
    new = Ed25519PrivateKey.generate()
    # signed with the attacker's own key
    forged = _proof(server, forger, sid, _pub(new))
    _not_replaced(server, sid, _import(server, code, sid, machine_id, new, forged))
    # a real proof (the victim's key, read from its home as if it had leaked) used once ...
    victim_key = serialization.load_pem_private_key((agent.home / "identity" / "key.pem").read_bytes(), None)
    proof = _proof(server, victim_key, sid, _pub(new))
    _not_replaced(server, sid, _import(server, code, sid, "another-machine", new, proof))  # other machine
    # ... and replayed: its nonce is spent
    _not_replaced(server, sid, _import(server, code, sid, machine_id, new, proof))
    # a proof bound to another new key
    other = Ed25519PrivateKey.generate()
    misbound = _proof(server, victim_key, sid, _pub(new))
    _not_replaced(server, sid, _import(server, code, sid, machine_id, other, misbound))
    _still_running(server, agent, sid)


def test_real_agent_reimport_after_abort_proves_its_key(server, agents, tmp_path):
    agent, sid, _ = _victim(server, agents, tmp_path)
    tid = server.show_source(sid)["task"]["task_id"]
    out = agent.run_cli("--abort")
    assert out.returncode == 0, out.stderr
    agent.proc.wait(timeout=40)
    assert (agent.home / "identity" / "previous_key.pem").exists()
    agent.start(code=server.new_code("wg-a", uses=1))
    new_sid = agent.wait_imported()
    assert new_sid != sid
    wait_for(lambda: server.source(sid)["status"] == "replaced", 15, "old source replaced")
    shown = server.show_source(sid)
    assert shown["replaced_by"] == new_sid and shown["task"]["status"] == "cancelled"
    assert shown["task"]["task_id"] == tid
    assert not (agent.home / "identity" / "previous_key.pem").exists()  # forgotten once proved
    assert "not marked replaced" not in agent.output()


def test_operator_replaces_a_source_explicitly(server, agents, tmp_path):
    agent, sid, machine_id = _victim(server, agents, tmp_path)
    newcomer = _import(server, server.new_code("wg-a", uses=1), None, machine_id).json()["source_id"]
    elsewhere = _import(server, server.new_code("wg-b", uses=1), None, machine_id).json()["source_id"]
    refused = server.cli("source", "replace", sid, "--by", elsewhere, check=False)
    assert refused.returncode == 4 and "associate" in refused.stderr and "Traceback" not in refused.stderr
    _still_running(server, agent, sid)
    # not while its agent still runs (it holds the source's session): the operator is told how
    live = server.cli("source", "replace", sid, "--by", newcomer, check=False)
    assert live.returncode != 0 and "its agent is running" in live.stderr and "--abort" in live.stderr
    _still_running(server, agent, sid)
    agent.stop()  # the old machine is gone; its lease runs out (3 heartbeat intervals)
    done = wait_for(lambda: _replaced(server, sid, newcomer), 30, "the replace once the lease expired")
    assert done["status"] == "replaced" and done["replaced_by"] == newcomer
    assert server.task_status(sid) == "cancelled"
    human = server.cli("source", "show", sid, json_out=False).stdout
    assert newcomer in human
    # the replaced agent is refused from now on
    agent.start()
    wait_for(lambda: "replaced" in agent.output() or agent.proc.poll() is not None, 30, "agent told")
