"""The ``drill`` command on the agent: parameter validation and the acknowledgement with the report."""

from __future__ import annotations

import time

import pytest

from go2cloud_client.commands import parse_command
from go2cloud_client.drill import runner
from go2cloud_client.drill.checks import Context
from go2cloud_client.drill.model import CRITICAL, INFO, Item, Report
from go2cloud_client.errors import CommandRejectedError
from tests.unit.agent.test_agent import FakeCP, make_agent  # noqa: F401 - the fixture

FILE = {"task_id": "t-1", "mode": "file", "paths": ["/srv", "/does/not/exist"],
        "target": {"kind": "rsync", "url": "https://10.0.0.1:8443/rsync/v1/tasks/t-1",
                   "fingerprint": "sha256:" + "ab" * 32, "module": "t-1"}}
BLOCK = {"task_id": "t-2", "mode": "block", "disks": [{"name": "vdb", "path": "/dev/vdb"}],
         "snapshot": "auto", "target": {"kind": "block", "url": "https://10.0.0.1:8443/block/v1/tasks/t-2",
                    "fingerprint": "sha256:" + "ab" * 32}}


def test_drill_params_are_checked_for_syntax_only():
    cmd = parse_command({"id": "c-1", "type": "drill", "params": FILE})
    assert cmd.drill is not None and cmd.drill.paths == ("/srv", "/does/not/exist")  # existence: a finding
    assert cmd.drill.targets == (("rsync target", "10.0.0.1", 8443),)
    default_port = {**FILE, "target": {"kind": "rsync", "url": "https://cp.example/rsync/v1/tasks/t-1"}}
    assert parse_command({"id": "c-4", "type": "drill", "params": default_port}).drill.targets == \
        (("rsync target", "cp.example", 443),)
    block = parse_command({"id": "c-2", "type": "drill", "params": BLOCK}).drill
    assert block is not None and block.disks == ("/dev/vdb",) and block.snapshot == "auto"
    assert block.targets == (("block receiver", "10.0.0.1", 8443),)
    for bad, field in (({**FILE, "paths": ["relative"]}, "paths[0]"), ({**FILE, "mode": "x"}, "mode"),
                       ({**FILE, "target": {"kind": "ftp"}}, "target.kind"),
                       ({**FILE, "target": {"kind": "rsync", "host": "10.0.0.1", "port": 8873}},
                        "target.url"),
                       ({**FILE, "target": {"kind": "rsync", "url": "http://10.0.0.1/rsync/v1/tasks/t-1"}},
                        "target.url"),
                       ({**FILE, "target": {"kind": "rsync", "url": "https://-x:1/rsync/v1/tasks/t-1"}},
                        "target.url"),
                       ({**FILE, "target": {"kind": "rsync", "url": "https://10.0.0.1:99999/rsync/v1/tasks/t"}},
                        "target.url"),
                       ({**BLOCK, "target": {"kind": "block", "url": "http://x/"}}, "target.url"),
                       ({**BLOCK, "disks": []}, "disks")):
        with pytest.raises(CommandRejectedError, match=field.replace("[", r"\[").replace("]", r"\]")):
            parse_command({"id": "c-3", "type": "drill", "params": bad})


class TimedCP(FakeCP):
    def __init__(self):
        super().__init__()
        self.results = {}

    def ack(self, cid, status, *, error_code=None, message=None, result=None):
        super().ack(cid, status, error_code=error_code, message=message, result=result)
        self.results[cid] = result

    def server_time(self):
        return time.time()


def _wait_final(agent, cid):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entry = agent.command_journal.get(cid)
        if entry and entry["status"] != "accepted":
            return entry
        time.sleep(0.02)
    raise AssertionError("the drill did not finish")


def test_drill_runs_on_its_own_thread_and_is_acknowledged_with_the_report(make_agent, monkeypatch):  # noqa: F811
    seen = {}

    def fake(ctx: Context) -> Report:
        seen["ctx"] = ctx
        return Report("file", [Item("sources", CRITICAL, "path /does/not/exist is missing", "fix the path"),
                               Item("clock", INFO, f"skew {ctx.time_probe().skew_s:.0f}")])

    monkeypatch.setattr(runner, "run_drill", fake)
    agent, cp = make_agent(TimedCP())
    assert agent.dispatch({"id": "c-1", "type": "drill", "params": FILE})
    entry = _wait_final(agent, "c-1")
    assert entry["status"] == "succeeded"
    report = entry["result"]["drill"]
    assert report["passed"] is False and report["summary"] == {"critical": 1, "warning": 0, "info": 1}
    ctx = seen["ctx"]
    assert ctx.paths == ("/srv", "/does/not/exist") and ctx.server_url == "https://cp.example"
    assert [(t.label, t.host, t.port) for t in ctx.targets] == [("rsync target", "10.0.0.1", 8443)]
    assert str(ctx.home) == str(agent.home.root)
    agent.flush_acks()
    assert ("c-1", "succeeded", None, None) in cp.acks
    assert cp.results["c-1"]["drill"]["items"][1]["check"] == "clock"
    assert not agent.dispatch({"id": "c-1", "type": "drill", "params": FILE})  # never twice


def test_a_drill_that_breaks_is_acknowledged_failed(make_agent, monkeypatch):  # noqa: F811
    def broken(ctx: Context) -> Report:
        raise RuntimeError("no /proc")

    monkeypatch.setattr(runner, "run_drill", broken)
    agent, cp = make_agent(TimedCP())
    agent.dispatch({"id": "c-9", "type": "drill", "params": FILE})
    entry = _wait_final(agent, "c-9")
    assert (entry["status"], entry["error_code"]) == ("failed", "drill_failed")
    assert "no /proc" in entry["message"]
