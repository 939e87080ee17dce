from __future__ import annotations

import pytest

from go2cloud_client.command_journal import CommandJournal
from go2cloud_client.errors import ConfigError


def test_accept_is_persisted_and_at_most_once_across_restart(home):
    led = CommandJournal(home).load()
    assert led.accept("c-1", "start")
    assert not led.accept("c-1", "start")
    again = CommandJournal(home).load()  # a restarted agent
    assert "c-1" in again and not again.accept("c-1", "start")
    assert again.get("c-1")["status"] == "accepted"


def test_final_status_acks_and_reload(home):
    led = CommandJournal(home).load()
    led.accept("c-1", "pause")
    led.finish("c-1", "succeeded", result={"x": 1})
    assert [cid for cid, _ in led.unsent()] == ["c-1"]
    led.mark_sent("c-1", "succeeded")
    assert led.unsent() == []
    led.finish("c-1", "failed", error_code="x")  # never overwrites a final status
    again = CommandJournal(home).load()
    entry = again.get("c-1")
    assert entry["status"] == "succeeded" and entry["ack_sent"] and entry["result"] == {"x": 1}


def test_unsent_acks_survive_restart(home):
    led = CommandJournal(home).load()
    led.finish("c-9", "unsupported", ctype="drill", error_code="unsupported", message="no")
    assert [cid for cid, _ in CommandJournal(home).load().unsent()] == ["c-9"]


def test_mark_sent_of_an_older_status_does_not_hide_the_new_one(home):
    led = CommandJournal(home).load()
    led.accept("c-1", "start")
    led.finish("c-1", "succeeded")
    led.mark_sent("c-1", "accepted")
    assert [cid for cid, _ in led.unsent()] == ["c-1"]


def test_interrupted_commands_are_failed_except_the_resumed_cycle(home):
    led = CommandJournal(home).load()
    led.accept("c-start", "start")
    led.accept("c-pause", "pause")
    assert led.fail_interrupted({"c-start"}, "stopped") == ["c-pause"]
    assert led.get("c-pause")["status"] == "failed" and led.get("c-pause")["error_code"] == "interrupted"
    assert led.get("c-start")["status"] == "accepted"


def test_bounded_but_never_drops_running_or_unsent(home):
    led = CommandJournal(home, max_entries=10).load()
    led.accept("c-keep", "start")
    for i in range(30):
        led.finish(f"c-{i}", "succeeded", ctype="pause")
        led.mark_sent(f"c-{i}", "succeeded")
    assert len(led) <= 10
    assert "c-keep" in led and "c-29" in led and "c-0" not in led


def test_newer_command_journal_version_refused(home):
    home.command_journal_file.write_text('{"version": 7, "entries": []}')
    with pytest.raises(ConfigError, match="version 7"):
        CommandJournal(home).load()
