"""A minimal protocol client that plays the agent against the real server (Ed25519 key, import,
challenge/token, heartbeat, commands, acks) and an HTTPS client pinned to the server, so every
answer of the control plane can be checked exactly (tests/integration/test_server_api.py, the
security tests)."""

from __future__ import annotations

import base64
from typing import Any, Dict, List, Optional

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from go2cloud_server.tlspin import pinned_session
from tests.support.harness import Server


class Api:
    """HTTPS to the server with the certificate pinned by fingerprint."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.session = pinned_session(server.fingerprint)
        self.admin = (server.data_dir / "admin.token").read_text().strip()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: Optional[str] = None,
        admin: bool = False,
        **kw: Any,
    ) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if admin:
            headers["Authorization"] = f"Bearer {self.admin}"
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        return self.session.request(
            method,
            self.server.url + "/api/v1" + path,
            json=body,
            headers=headers,
            timeout=30,
            verify=False,
            **kw,
        )


class FakeAgent:
    def __init__(self, api: Api, hostname: str = "web01", machine_id: str = "m-web01") -> None:
        self.api = api
        self.key = Ed25519PrivateKey.generate()
        self.hostname = hostname
        self.machine_id = machine_id
        self.source_id: Optional[str] = None
        self.token: Optional[str] = None

    def public_key(self) -> str:
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def import_(
        self, code: Dict[str, Any], previous: Optional[str] = None, proof: Optional[Dict[str, str]] = None
    ) -> requests.Response:
        body = {
            "token_id": code["token_id"],
            "token_code": code["token_code"],
            "public_key": self.public_key(),
            "agent_version": "0.1.0",
            "previous_source_id": previous,
            "previous_source_proof": proof,
            "inventory": {
                "hostname": self.hostname,
                "machine_id": self.machine_id,
                "os": {"family": "linux", "id": "debian", "pretty_name": "Debian 12"},
                "mounts": [{"mountpoint": "/", "fstype": "ext4"}],
            },
        }
        resp = self.api.call("POST", "/sources/import", body)
        if resp.status_code == 201:
            self.source_id = resp.json()["source_id"]
        return resp

    def login(self) -> None:
        sid = self.source_id
        ch = self.api.call("POST", f"/sources/{sid}/challenge")
        assert ch.status_code == 200, ch.text
        nonce = ch.json()["nonce"]
        sig = self.key.sign(b"go2cloud-token-v1\n" + sid.encode() + b"\n" + nonce.encode())
        tok = self.api.call(
            "POST", f"/sources/{sid}/token", {"nonce": nonce, "signature": base64.b64encode(sig).decode()}
        )
        assert tok.status_code == 200, tok.text
        self.token = tok.json()["token"]

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.api.call("GET", f"/sources/{self.source_id}{path}", token=self.token, **kw)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.api.call("POST", f"/sources/{self.source_id}{path}", body, token=self.token)

    def heartbeat(self) -> Dict[str, Any]:
        resp = self.post(
            "/heartbeat",
            {
                "agent_version": "0.1.0",
                "state": "idle",
                "task_id": None,
                "phase": None,
                "cycle": None,
                "progress": None,
                "last_error": None,
                "load": None,
            },
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    def commands(self, wait: float = 0) -> List[Dict[str, Any]]:
        resp = self.get("/commands", params={"wait": wait})
        assert resp.status_code == 200, resp.text
        return resp.json()["commands"]

    def ack(self, cid: str, status: str = "succeeded", **kw: Any) -> requests.Response:
        return self.post(
            f"/commands/{cid}",
            {
                "status": status,
                "error_code": kw.get("error_code"),
                "message": kw.get("message"),
                "result": kw.get("result", {}),
            },
        )
