from __future__ import annotations

import logging
import time

import pytest

from go2cloud_client.agent import Agent
from go2cloud_client.config import Config
from go2cloud_client.console import Console
from go2cloud_client.errors import ServerUnreachableError
from go2cloud_client.identity import Identity

SOURCE = {"source_id": "s-abc", "workgroup": {"id": "wg-1", "name": "wg"}, "server": "https://cp.example",
          "heartbeat_interval": 10}


class FakeCP:
    server = "https://cp.example"

    def __init__(self):
        self.acks = []
        self.down = False
        self.beat = {"server_time_epoch": time.time(), "commands_waiting": False, "heartbeat_interval": 5}

    def ack(self, cid, status, *, error_code=None, message=None, result=None):
        if self.down:
            raise ServerUnreachableError("down")
        self.acks.append((cid, status, error_code, message))

    epoch = 0

    def open_session(self, session_id, instance, fingerprint):
        if self.down:
            raise ServerUnreachableError("down")
        self.epoch = 1
        return 1

    def heartbeat(self, payload):
        if self.down:
            raise ServerUnreachableError("down")
        self.payload = payload
        return self.beat

    def post_events(self, events):
        pass

    def get_task(self, task_id):
        raise AssertionError("not expected")

    def authenticate(self):
        pass

    def close(self):
        pass


class Quiet(Console):
    def __init__(self):
        super().__init__(stream=open("/dev/null", "w"), tty=False)


@pytest.fixture
def make_agent(home):
    def make(cp=None):
        cp = cp or FakeCP()
        agent = Agent(home, Config(), dict(SOURCE), Identity.generate(), console=Quiet(), control_plane=cp,
                      replicator_factory=lambda **kw: pytest.fail("no transfer expected"))
        agent.command_journal.load()
        return agent, cp
    return make


def test_unknown_type_is_unsupported_and_a_bad_drill_rejected(make_agent):
    agent, cp = make_agent()
    assert agent.dispatch({"id": "c-1", "type": "reboot", "params": {}})
    assert agent.dispatch({"id": "c-2", "type": "drill", "params": {}})
    agent.flush_acks()
    assert [(a[0], a[1], a[2]) for a in cp.acks] == [("c-1", "unsupported", "unsupported"),
                                                     ("c-2", "rejected", "command_rejected")]


def test_a_type_that_is_not_a_string_is_rejected_and_the_next_command_runs(make_agent):
    agent, cp = make_agent()
    assert agent.dispatch({"id": "c-1", "type": ["pause"], "params": {}})
    assert agent.dispatch({"id": "c-2", "params": {}})
    assert agent.dispatch({"id": "c-3", "type": "reboot", "params": {}})
    agent.flush_acks()
    assert [(a[0], a[1], a[2]) for a in cp.acks] == [("c-1", "rejected", "command_rejected"),
                                                     ("c-2", "rejected", "command_rejected"),
                                                     ("c-3", "unsupported", "unsupported")]


def test_invalid_params_rejected_naming_field(make_agent):
    agent, cp = make_agent()
    agent.dispatch({"id": "c-1", "type": "modify", "params": {"task_id": "t-1", "compression": 99}})
    agent.flush_acks()
    cid, status, code, message = cp.acks[0]
    assert (status, code) == ("rejected", "command_rejected") and "'compression'" in message


def test_redelivery_answered_from_command_journal_and_never_rerun(make_agent):
    agent, cp = make_agent()
    raw = {"id": "c-1", "type": "pause", "params": {"task_id": "t-1"}}
    assert agent.dispatch(raw)
    agent.flush_acks()
    assert cp.acks[-1][:3] == ("c-1", "failed", "task_unknown")
    assert not agent.dispatch(raw)  # redelivered: the final ack is sent again, nothing runs
    assert cp.acks[-1][:3] == ("c-1", "failed", "task_unknown") and len(cp.acks) == 2
    again, cp2 = make_agent()  # restart on the same home
    assert not again.dispatch(raw)
    assert cp2.acks == [("c-1", "failed", "task_unknown", cp.acks[0][3])]


def test_in_progress_redelivery_does_nothing(make_agent):
    agent, cp = make_agent()
    agent.command_journal.accept("c-1", "start")
    agent.command_journal.mark_sent("c-1", "accepted")
    assert not agent.dispatch({"id": "c-1", "type": "start", "params": {}})
    assert cp.acks == []


def test_acks_kept_while_unreachable_and_sent_later(make_agent, caplog):
    caplog.set_level(logging.INFO)
    agent, cp = make_agent()
    cp.down = True
    agent.dispatch({"id": "c-1", "type": "reboot", "params": {}})
    agent.flush_acks()
    agent.heartbeat_once()
    agent.heartbeat_once()
    assert cp.acks == [] and agent.command_journal.unsent()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # one per outage, not per retry
    cp.down = False
    agent.heartbeat_once()
    agent.flush_acks()
    assert cp.acks[0][:2] == ("c-1", "unsupported") and not agent.command_journal.unsent()
    assert any("reconnected" in r.getMessage() for r in caplog.records)


def test_heartbeat_payload_status_file_and_interval(make_agent, home):
    agent, cp = make_agent()
    agent.heartbeat_once()
    p = cp.payload
    assert p["state"] == "idle" and p["task_id"] is None and p["progress"] is None
    assert set(p["load"]) == {"load1", "cpu_percent", "memory_percent"}
    assert agent.interval == 5
    status = home.read_state(home.status_file)
    assert status["source_id"] == "s-abc" and status["state"] == "idle" and status["running"] is True


def test_clock_skew_warning(make_agent, caplog):
    agent, cp = make_agent()
    cp.beat = dict(cp.beat, server_time_epoch=time.time() - 3600)
    agent.heartbeat_once()
    assert any("clock" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_next_command_runs_as_soon_as_a_redelivered_ones_ack_arrives(make_agent, monkeypatch):
    """The control plane may answer a poll before it has the acknowledgement of the command the
    agent just finished, so the poll brings that command again. The agent then pauses before it
    polls again; the pause must end when the acknowledgement arrives, or the next command (e.g.
    the start queued when a drill passes) waits the whole pause. Set to an hour here: without
    the wake-up the second command is never run within the test's 30 s."""
    import threading

    from go2cloud_client import agent as agent_mod

    monkeypatch.setattr(agent_mod, "REDELIVERY_PAUSE_S", 3600.0)
    first = {"id": "c-1", "type": "pause", "params": {"task_id": "t-1"}}
    second = {"id": "c-2", "type": "pause", "params": {"task_id": "t-2"}}
    redelivered = threading.Event()
    acked = {}

    class ScriptedCP(FakeCP):
        def __init__(self):
            super().__init__()
            self.polls = 0

        def poll_commands(self, wait=25):
            self.polls += 1
            if self.polls == 1:
                return [first]
            if self.polls == 2:  # answered before the control plane had c-1's acknowledgement
                redelivered.set()
                return [first]
            if "c-1" in acked:
                return [second]
            return []

        def ack(self, cid, status, *, error_code=None, message=None, result=None):
            if cid == "c-1":
                redelivered.wait(30)  # the acknowledgement lands after the second poll's answer
            acked[cid] = status
            super().ack(cid, status, error_code=error_code, message=message, result=result)

    agent, cp = make_agent(ScriptedCP())
    loops = [threading.Thread(target=agent._commands_loop, daemon=True),
             threading.Thread(target=agent._acks_loop, daemon=True)]
    for loop in loops:
        loop.start()
    try:
        deadline = time.monotonic() + 30
        while "c-2" not in acked and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        agent.stop()
    acks = [a[:3] for a in cp.acks]  # c-1's may go twice: the acks loop and the redelivery
    assert acks[0] == ("c-1", "failed", "task_unknown") and ("c-2", "failed", "task_unknown") in acks
    assert cp.polls >= 3
