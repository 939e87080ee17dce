"""The real ``go2cloud_server serve`` driven over HTTPS (pinned) and through its operator CLI.

No agent here: a minimal protocol client (tests/support/fakeagent.py: Ed25519 key, import,
challenge/token, heartbeat, commands, acks) plays the agent so every answer of the control plane
can be checked exactly.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import requests

from tests.support.fakeagent import Api, FakeAgent
from tests.support.harness import Server, wait_for

pytestmark = pytest.mark.integration


def _err(resp: requests.Response) -> str:
    return resp.json()["error"]["code"]


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.fixture
def api(server: Server) -> Api:
    return Api(server)


def test_workgroup_rules_through_cli_and_api(server: Server, api: Api):
    wg = server.j(
        "workgroup", "create", "東京-web", "--description", "front", "--tag", "env=prod", "--tag", "t="
    )
    assert wg["name"] == "東京-web" and wg["tags"] == {"env": "prod", "t": ""}
    human = server.cli("workgroup", "list", json_out=False).stdout
    assert "東京-web" in human and "not_started" in human

    bad = server.cli("workgroup", "create", "9lives", check=False)
    assert bad.returncode == 2 and "start with a letter" in bad.stderr
    _no_traceback(bad)
    for name in ("http://evil", "x", "a b"):
        proc = server.cli("workgroup", "create", name, check=False)
        assert proc.returncode == 2, (name, proc.stderr)
        _no_traceback(proc)
    dup = server.cli("workgroup", "create", "東京-web", check=False)
    assert dup.returncode == 4 and "already exists" in dup.stderr
    _no_traceback(dup)
    too_many_tags = ["--tag" if i % 2 == 0 else f"k{i}=v" for i in range(42)]
    proc = server.cli("workgroup", "create", "tagged", *too_many_tags, check=False)
    assert proc.returncode == 2 and "at most 20" in proc.stderr
    missing = server.cli("workgroup", "show", "nope", check=False)
    assert missing.returncode == 3 and "no workgroup 'nope'" in missing.stderr
    _no_traceback(missing)

    # 50 workgroups per server (49 more over the API, the 51st through the CLI)
    for i in range(49):
        resp = api.call("POST", "/workgroups", {"name": f"wg{i:02d}"}, admin=True)
        assert resp.status_code == 201, resp.text
    over = server.cli("workgroup", "create", "one-too-many", check=False)
    assert over.returncode == 4 and "limit" in over.stderr
    assert len(server.j("workgroup", "list")["workgroups"]) == 50

    # deletable only when empty
    code = server.new_code("wg00", uses=1)
    agent = FakeAgent(api)
    assert agent.import_(code).status_code == 201
    busy = server.cli("workgroup", "delete", "wg00", check=False)
    assert busy.returncode == 4 and "disassociate" in busy.stderr
    server.j("source", "disassociate", agent.source_id)
    assert server.j("workgroup", "delete", "wg00") == {}
    assert server.cli("workgroup", "show", "wg00", check=False).returncode == 3


@pytest.mark.shared_server
def test_codes_limits_revoke_and_distinct_errors(server: Server, api: Api):
    server.j("workgroup", "create", "apps")
    for args, field in (
        (["--uses", "0"], "--uses"),
        (["--uses", "1001"], "--uses"),
        (["--days", "91"], "--days"),
        (["--days", "0"], "--days"),
    ):
        proc = server.cli("code", "create", "--workgroup", "apps", *args, check=False)
        assert proc.returncode == 2 and field in proc.stderr, proc.stderr
        _no_traceback(proc)
    typo = server.cli("code", "create", "--workgroup", "apps", "--uses", "many", check=False)
    assert typo.returncode == 2 and typo.stderr.startswith("error: ") and "Traceback" not in typo.stderr

    default = server.new_code("apps", uses=200)
    assert default["uses_left"] == 200 and default["token_id"].startswith("at-")
    human = server.cli("code", "create", "--workgroup", "apps", json_out=False).stdout
    pin = server.info["spki_pin"]
    assert f"curl -fsS --insecure --pinnedpubkey '{pin}' {server.url}/download/install.sh" in human
    assert f"DownloadString('{server.url}/download/install.ps1')" in human
    assert f"--server {server.url} --server-fingerprint {server.fingerprint}" in human

    code = server.new_code("apps", uses=2)
    assert code["commands"]["linux"].endswith(f"--token-id {code['token_id']}")
    assert f"GO2CLOUD_TOKEN_CODE='{code['token_code']}'" in code["commands"]["linux"]
    listed = server.cli("code", "list", "--workgroup", "apps").stdout
    assert code["token_id"] in listed and code["token_code"] not in listed

    wrong = FakeAgent(api).import_(dict(code, token_code=code["token_code"][::-1]))
    assert (wrong.status_code, _err(wrong)) == (403, "code_unknown")
    unknown = FakeAgent(api).import_(dict(code, token_id="at-0000000000000000"))
    assert (unknown.status_code, _err(unknown)) == (403, "code_unknown")
    assert FakeAgent(api).import_(code).status_code == 201
    revoked = server.j("code", "revoke", code["token_id"])
    assert revoked["state"] == "revoked" and revoked["uses_left"] == 1
    resp = FakeAgent(api).import_(code)
    assert (resp.status_code, _err(resp)) == (403, "code_revoked")
    assert server.cli("code", "revoke", "at-nope", check=False).returncode == 3

    one = server.new_code("apps", uses=1)
    assert FakeAgent(api).import_(one).status_code == 201
    resp = FakeAgent(api).import_(one)
    assert (resp.status_code, _err(resp)) == (403, "code_exhausted")


@pytest.mark.shared_server
def test_concurrent_imports_consume_the_count_exactly(server: Server, api: Api):
    server.j("workgroup", "create", "fleet")
    code = server.new_code("fleet", uses=5)
    statuses: List[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def worker(i: int) -> None:
        agent = FakeAgent(Api(server), hostname=f"h{i}", machine_id=f"m{i}")
        barrier.wait()
        resp = agent.import_(code)
        with lock:
            statuses.append((resp.status_code, None if resp.status_code == 201 else _err(resp)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(statuses, key=str) == sorted([(201, None)] * 5 + [(403, "code_exhausted")] * 15, key=str)
    assert len(server.j("source", "list", "--workgroup", "fleet")["sources"]) == 5
    codes = server.j("code", "list", "--workgroup", "fleet")["codes"]
    assert [(c["uses_left"], c["state"]) for c in codes] == [(0, "exhausted")]


def test_code_expiry_with_a_shifted_server_clock(tmp_path: Path, server: Server, api: Api):
    server.j("workgroup", "create", "later")
    code = server.new_code("later", uses=10)
    short = server.j("code", "create", "--workgroup", "later", "--days", "1")
    server.stop()
    shifted = Server(server.data_dir, extra_args=["--clock-offset-s", str(2 * 86400)]).start()
    try:
        api2 = Api(shifted)
        assert shifted.fingerprint == server.fingerprint  # the certificate survives a restart
        resp = FakeAgent(api2).import_(short)
        assert (resp.status_code, _err(resp)) == (403, "code_expired")
        assert FakeAgent(api2).import_(code).status_code == 201  # 90 days: still valid
        states = {c["token_id"]: c["state"] for c in shifted.j("code", "list")["codes"]}
        assert states == {code["token_id"]: "active", short["token_id"]: "expired"}
    finally:
        shifted.stop()


@pytest.mark.shared_server
def test_agent_auth_heartbeat_offline_and_long_poll(server: Server, api: Api):
    server.j("workgroup", "create", "edge")
    agent = FakeAgent(api)
    resp = agent.import_(server.new_code("edge"))
    assert resp.status_code == 201
    body = resp.json()
    assert body["workgroup"]["name"] == "edge" and body["heartbeat_interval"] == 1
    assert len(agent.source_id) == 18 and agent.source_id.startswith("s-")

    # no token, a wrong token, a bad signature, an unknown source
    assert _err(agent.get("/commands")) == "unauthorized"
    agent.token = "forged"
    assert agent.get("/commands").status_code == 401
    ch = api.call("POST", f"/sources/{agent.source_id}/challenge").json()
    bad = api.call(
        "POST",
        f"/sources/{agent.source_id}/token",
        {"nonce": ch["nonce"], "signature": base64.b64encode(b"\0" * 64).decode()},
    )
    assert (bad.status_code, _err(bad)) == (401, "unauthorized")
    ghost = api.call("POST", "/sources/s-0000000000000000/challenge")
    assert (ghost.status_code, _err(ghost)) == (404, "source_unknown")
    agent.login()
    hb = agent.heartbeat()
    assert hb["commands_waiting"] is False and abs(hb["server_time_epoch"] - time.time()) < 5
    assert server.source(agent.source_id)["status"] == "online"

    t0 = time.monotonic()
    assert agent.commands(wait=1.5) == []
    assert 1.4 <= time.monotonic() - t0 < 5
    bad_wait = agent.get("/commands", params={"wait": 61})
    assert (bad_wait.status_code, _err(bad_wait)) == (400, "invalid_request")

    # long poll woken by migration start
    got: Dict[str, Any] = {}

    def poll() -> None:
        started = time.monotonic()
        got["cmds"] = agent.commands(wait=30)
        got["dt"] = time.monotonic() - started

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.5)
    agent.heartbeat()  # offline after 3 missed 1-second heartbeats: not migratable then
    out = server.j(
        "migration", "start", "--workgroup", "edge", "--path", "/srv/data", "--bandwidth-mbps", "20"
    )
    th.join(30)
    assert out["started"], out
    assert got["dt"] < 10
    # the drill comes first: what to check and where the target is, without its password
    assert [c["type"] for c in got["cmds"]] == ["drill"]
    drill = got["cmds"][0]["params"]
    assert drill["task_id"] == out["started"][0]["task_id"] and drill["paths"] == ["/srv/data"]
    assert drill["target"] == {
        "kind": "rsync", "url": f"{server.url}/rsync/v1/tasks/{drill['task_id']}",
        "fingerprint": server.fingerprint, "module": drill["task_id"],
    }
    assert server.task_status(agent.source_id) == "drilling"
    assert server.j("migration", "show", "--workgroup", "edge")["status"] == "in_progress"
    # this fake agent is "older": it does not know the drill -> passed with a warning, start queued
    assert agent.ack(got["cmds"][0]["id"], "unsupported", error_code="unsupported").status_code == 200
    assert server.task_status(agent.source_id) == "drill_passed"
    report = server.drill(agent.source_id)
    assert report["status"] == "passed" and report["report"]["ran"] is False
    assert [(i["check"], i["severity"]) for i in report["report"]["items"]] == [("drill_not_run", "warning")]
    (start,) = agent.commands()
    params = start["params"]
    assert start["type"] == "start" and params["task_id"] == drill["task_id"]
    assert (
        params["target"]["url"] == f"{server.url}/rsync/v1/tasks/{params['task_id']}"
        and params["target"]["module"] == params["task_id"]
    )
    agent.ack(start["id"], "accepted")  # the agent took the start: syncing from now on
    task = agent.get(f"/tasks/{params['task_id']}").json()
    assert task["target"]["password"] == params["target"]["password"] and task["status"] == "syncing"
    history = server.source_migration(agent.source_id)["tasks"][0]["history"]
    assert [h["status"] for h in history] == ["drilling", "drill_passed", "syncing"]

    # offline after 3 missed heartbeats (interval 1 s)
    wait_for(lambda: server.source(agent.source_id)["status"] == "offline", 10, "offline status")
    agent.heartbeat()
    assert server.source(agent.source_id)["status"] == "syncing"


@pytest.mark.shared_server
def test_migration_cycles_artifacts_and_completion(server: Server, api: Api):
    server.j("workgroup", "create", "db")
    agent = FakeAgent(api)
    agent.import_(server.new_code("db"))
    agent.login()
    agent.heartbeat()
    out = server.j(
        "migration", "start", "--workgroup", "db", "--keep-images", "2", "--sync-every", "1h", "--no-drill"
    )
    tid = out["started"][0]["task_id"]
    r = server.cli("migration", "start", "--workgroup", "db", check=False)
    again = json.loads(r.stdout)  # the reasons are printed, then exit 6: nothing started
    assert again["started"] == [] and "already has migration task" in again["skipped"][0]["reason"]
    assert r.returncode == 6 and "no migration started" in r.stderr, (r.returncode, r.stderr)
    agent.heartbeat()  # not offline (3 missed 1-second heartbeats) on a loaded machine
    one = server.cli("migration", "start", "--source", agent.source_id, check=False)
    assert one.returncode == 6 and "already has migration task" in one.stderr

    start = agent.commands()[0]
    cycle_dir = server.data_dir / "tasks" / tid / "tree" / "000001"
    assert cycle_dir.is_dir()
    (cycle_dir / "hello.txt").write_text("hello")
    assert agent.ack(start["id"], "accepted").status_code == 200
    assert agent.ack(start["id"], result={"cycle": 1}).status_code == 200
    assert server.task_status(agent.source_id) == "pending"
    arts = server.artifacts(agent.source_id)
    assert [(a["cycle"], a["files"]) for a in arts] == [(1, 1)]

    for n in (2, 3):
        sync = server.j("migration", "sync", "--source", agent.source_id)
        assert sync["affected"][0]["task_id"] == tid
        cmd = agent.commands()[0]
        assert cmd["params"]["cycle"] == {"number": n, "dest": f"{n:06d}", "link_dest": f"{n - 1:06d}"}
        busy = server.cli("migration", "sync", "--source", agent.source_id, check=False)
        assert busy.returncode == 4 and "already syncing" in busy.stderr
        agent.ack(cmd["id"])
    assert [a["cycle"] for a in server.artifacts(agent.source_id)] == [2, 3]

    server.j("migration", "pause", "--workgroup", "db")
    assert server.j("migration", "show", "--workgroup", "db")["status"] == "paused"
    server.j("migration", "resume", "--workgroup", "db")
    server.j("migration", "modify", "--source", agent.source_id, "--compression", "3", "--sync-every", "off")
    types = [c["type"] for c in agent.commands()]
    assert types == ["pause", "resume", "modify"]
    for c in agent.commands():
        agent.ack(c["id"])

    server.j("migration", "complete", "--source", agent.source_id, "--final-sync")
    fin = agent.commands()[0]
    assert fin["type"] == "finalize" and fin["params"]["cycle"]["number"] == 4
    agent.ack(fin["id"])
    shown = server.j("migration", "show", "--workgroup", "db")
    assert shown["status"] == "completed" and shown["tasks"][0]["status"] == "completed"
    assert [a["cycle"] for a in server.artifacts(agent.source_id)] == [3, 4]
    assert server.j("migration", "artifacts", "--task", tid)["artifacts"][-1]["cycle"] == 4
    human = server.cli("migration", "show", "--source", agent.source_id, json_out=False).stdout
    assert "completed" in human and tid in human


@pytest.mark.shared_server
def test_cancel_and_reimport_replacement(server: Server, api: Api):
    server.j("workgroup", "create", "mig")
    code = server.new_code("mig", uses=3)
    agent = FakeAgent(api)
    agent.import_(code)
    agent.login()
    agent.heartbeat()
    tid = server.j("migration", "start", "--source", agent.source_id)["started"][0]["task_id"]
    server.j("migration", "cancel", "--source", agent.source_id)
    assert [c["type"] for c in agent.commands()] == ["abort"]  # the undelivered start was superseded
    assert server.task_status(agent.source_id) == "cancelled"
    assert not (server.data_dir / "tasks" / tid / "tree" / "000001").exists()

    again = FakeAgent(api, machine_id=agent.machine_id)
    # the re-import proves the old source's key (docs/protocol.md, Import)
    nonce = api.call("POST", f"/sources/{agent.source_id}/challenge").json()["nonce"]
    signed = agent.key.sign(
        b"go2cloud-replace-v1\n" + agent.source_id.encode() + b"\n" + again.public_key().encode() + b"\n"
        + nonce.encode()
    )
    proof = {"nonce": nonce, "signature": base64.b64encode(signed).decode()}
    reimport = again.import_(code, previous=agent.source_id, proof=proof)
    assert reimport.status_code == 201 and reimport.json()["replaced_source_id"] == agent.source_id
    gone = agent.get("/commands")
    assert (gone.status_code, _err(gone)) == (410, "source_replaced")
    assert server.source(agent.source_id)["status"] == "replaced"
    assert server.source(again.source_id)["workgroup"]["name"] == "mig"


@pytest.mark.shared_server
def test_invalid_input_oversized_body_and_unreachable(server: Server, api: Api, tmp_path: Path):
    server.j("workgroup", "create", "ops")
    cases = [
        (["migration", "start"], 2, "exactly one of"),
        (["migration", "start", "--workgroup", "ops", "--path", "relative/dir"], 2, "must be absolute"),
        (["migration", "start", "--workgroup", "ops", "--sync-every", "10x"], 2, "--sync-every"),
        (["migration", "start", "--workgroup", "ops", "--sync-every", "30s"], 2, "sync_every_s"),
        (["migration", "start", "--workgroup", "ops", "--compression", "11"], 2, "--compression"),
        (["migration", "modify", "--workgroup", "ops"], 2, "at least one"),
        (["migration", "show", "--source", "s-nope"], 3, "no source"),
        (["migration", "artifacts", "--task", "t-nope"], 3, "no task"),
        (["source", "associate", "s-nope", "--workgroup", "ops"], 3, "no source"),
        (["workgroup", "list", "--server-fingerprint", "sha256:zz"], 2, "fingerprint"),
        (["workgroup", "list", "--server-fingerprint", "sha256:" + "0" * 64], 10, "fingerprint"),
        (["workgroup", "list", "--server", "https://127.0.0.1:1"], 10, "cannot reach"),
        (["workgroup", "list", "--bogus-flag"], 2, "no such option"),
    ]
    for args, code, fragment in cases:
        proc = server.cli(*args, check=False)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr)
        assert fragment in proc.stderr, (args, proc.stderr)
        _no_traceback(proc)

    import subprocess
    import sys

    from tests.support.harness import _env

    env = _env({"GO2CLOUD_DATA_DIR": str(server.data_dir), "GO2CLOUD_ADMIN_TOKEN": "wrong"})
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_server", "workgroup", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 5 and "admin token" in proc.stderr
    _no_traceback(proc)
    env = _env({"GO2CLOUD_DATA_DIR": str(tmp_path / "empty")})
    env.pop("GO2CLOUD_ADMIN_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "go2cloud_server", "workgroup", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 10 and "no server found" in proc.stderr

    # raw API: bodies over 1 MiB, non-JSON bodies, wrong types, unknown endpoints, no admin token
    big = api.call(
        "POST",
        "/sources/import",
        data=b"{" + b" " * (1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert (big.status_code, _err(big)) == (413, "too_large")
    notjson = api.call("POST", "/workgroups", data=b"{nope", admin=True)
    assert (notjson.status_code, _err(notjson)) == (400, "invalid_request")
    wrongtype = api.call("POST", "/workgroups/ops/codes", {"uses": "ten"}, admin=True)
    assert (wrongtype.status_code, _err(wrongtype)) == (400, "invalid_request")
    assert "uses" in wrongtype.json()["error"]["message"]
    assert api.call("GET", "/nothing", admin=True).status_code == 404
    noauth = api.call("GET", "/workgroups")
    assert (noauth.status_code, _err(noauth)) == (401, "unauthorized")
    # the server is still healthy afterwards
    assert api.call("GET", "/workgroups", admin=True).status_code == 200
    log_text = Path(server.log.name).read_text(errors="replace")
    assert "POST /api/v1/sources/import -> 413" in log_text  # requests are logged ...
    assert api.admin not in log_text  # ... secrets are not


@pytest.mark.shared_server
def test_server_json_and_files(server: Server):
    info = json.loads((server.data_dir / "server.json").read_text())
    assert set(info) >= {"url", "fingerprint", "pid"} and "rsync_port" not in info
    for name in ("admin.token", "tls/key.pem", "server.json"):
        assert (server.data_dir / name).stat().st_mode & 0o077 == 0, name
