"""A code holder cannot reach the operator's terminal with control characters.

Everything a source sends (hostname, OS name, agent version, kernel, events, drill items, error
messages) is shown by the operator commands of ``go2cloud_server``. A hostile source imports
itself with escape sequences, carriage returns and bidi overrides in its inventory (through the
real import API, as any code holder can), and the human output of ``source list`` / ``source
show`` / ``workgroup show`` must carry none of them raw, while ``--json`` keeps the exact string.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.support.fakeagent import Api, FakeAgent
from tests.support.harness import Server, _env

pytestmark = pytest.mark.integration

# clear screen, carriage return + fake line, set window title, cursor up, bidi overrides, C1 CSI, DEL
HOSTILE = ("web\x1b[2J\x1b[H\rFAKE  online\n\x1b]0;owned\x07\x1b[1A"
           "\u202eevil\u202c\u2066x\u2069\x9b31m\x7f\x00end")
#: what must never reach the terminal: C0 except the layout's own newlines, DEL, C1, bidi controls
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f\x80-\x9f\u202a-\u202e\u2066-\u2069]")


def _hostile_source(server: Server) -> FakeAgent:
    server.j("workgroup", "create", "web-tier")
    code = server.new_code("web-tier", uses=1)
    agent = FakeAgent(Api(server), hostname=HOSTILE)
    body_os = {"family": "linux", "id": "debian", "pretty_name": "Debian\x1b[31m 12\r"}
    resp = agent.api.call("POST", "/sources/import", {
        "token_id": code["token_id"], "token_code": code["token_code"],
        "public_key": agent.public_key(), "agent_version": "0.1\x1b[8m",
        "inventory": {"hostname": HOSTILE, "machine_id": "m-1", "os": body_os, "kernel": "6.1\x9b2J",
                      "mounts": [{"mountpoint": "/", "fstype": "ext4"}]}})
    assert resp.status_code == 201, resp.text
    agent.source_id = resp.json()["source_id"]
    agent.login()
    events = {"events": [{"time": "2026-01-01T00:00:00Z", "level": "error", "code": "x\x1b[2Jy",
                          "message": "disk \x1b[2K\rfull\u202e"}]}
    assert agent.post("/events", events).status_code == 200
    return agent


def _human(server: Server, *args: str) -> str:
    """Human output of an operator command, as the bytes the terminal would get (no newline
    translation: a raw carriage return must be seen)."""
    proc = subprocess.run([sys.executable, "-m", "go2cloud_server", *args], capture_output=True, timeout=60,
                          env=_env({"GO2CLOUD_DATA_DIR": str(server.data_dir)}))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode("utf-8")


def _assert_clean(text: str) -> None:
    found = RAW.findall(text)
    assert not found, f"raw control characters reached the terminal: {found!r} in {text!r}"
    assert "\\x1b" in text, "the escape character must be shown visibly, not dropped"


def test_agent_strings_never_reach_the_terminal_raw(server: Server):
    agent = _hostile_source(server)
    sid = agent.source_id

    listed = _human(server, "source", "list")
    _assert_clean(listed)
    # the source is one table row: its hostname cannot add or overwrite lines
    assert len(listed.rstrip("\n").split("\n")) == 2, listed
    shown = _human(server, "source", "show", sid)
    _assert_clean(shown)
    assert "\\x1b[31m" in shown and "\\x9b2J" in shown  # OS name and kernel too
    wg = _human(server, "workgroup", "show", "web-tier")
    _assert_clean(wg)
    # --json stays exact: the operator's tools get what the source sent
    assert server.source(sid)["hostname"] == HOSTILE
    doc = json.loads(server.cli("source", "show", sid).stdout)
    assert doc["hostname"] == HOSTILE and doc["agent_version"] == "0.1\x1b[8m"
    assert any(e["message"] == "disk \x1b[2K\rfull\u202e" for e in doc["events"])

    # drill items and a task's error message come from the source too
    agent.heartbeat()
    server.j("migration", "start", "--source", sid, "--path", "/srv")
    drill = agent.commands()[0]
    assert drill["type"] == "drill"
    report = {"drill": {"items": [{"check": "disk\x1b[5m", "severity": "critical",
                                    "finding": "fake\r\x1b[32mPASSED\x1b[0m", "fix": "\u202erm -rf"}]}}
    assert agent.ack(drill["id"], result=report).status_code == 200
    drill_text = _human(server, "drill", "show", "--source", sid)
    _assert_clean(drill_text)
    assert "fake\\x0d\\x1b[32mPASSED" in drill_text and "\\u202erm -rf" in drill_text
    server.j("migration", "drill", "--source", sid, "--override")
    start = next(c for c in agent.commands() if c["type"] == "start")
    assert agent.ack(start["id"], "failed", error_code="rsync\x1b[2J",
                     message="boom\x1b]0;title\x07\r").status_code == 200
    migration = _human(server, "migration", "show", "--source", sid)
    _assert_clean(migration)
    assert "boom\\x1b]0;title\\x07\\x0d" in migration

    doc = json.loads(server.cli("migration", "show", "--source", sid).stdout)
    assert doc["tasks"][0]["error"]["message"] == "boom\x1b]0;title\x07\r"

    # the server's own log (read on a terminal, journalctl) names the hostname escaped too
    log = (server.data_dir.parent / f"{server.data_dir.name}-serve.log").read_text(encoding="utf-8")
    assert "web\\x1b[2J" in log
    _assert_clean(log)


def test_terminal_safe_escapes_every_control_and_nothing_else():
    from go2cloud_server.cli import terminal_safe

    controls = [chr(c) for c in [*range(0x20), 0x7f, *range(0x80, 0xa0), 0x61c, 0x200e, 0x200f,
                                 0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a)]]
    for ch in controls:
        shown = terminal_safe(f"a{ch}b")
        assert not RAW.search(shown) and ch not in shown and shown.startswith("a\\") and shown.endswith("b")
    assert terminal_safe("\x1b[2J") == "\\x1b[2J" and terminal_safe("\u202e") == "\\u202e"
    plain = "東京-web ü é \\x1b ok"
    assert terminal_safe(plain) == plain and terminal_safe(terminal_safe("\x1b")) == "\\x1b"
