"""The operator CLI's human output of server documents."""

from __future__ import annotations

from go2cloud_server.cli import _check_text


def test_a_skipped_filesystem_check_reads_as_skipped_not_failed():
    """A delta generation on a nearly full target is hashed but not fsck'd: its report says
    {"ok": null, "skipped": "room", "summary": ...}. The artifact table showed it as
    "failed (rc None)"; it must show why it was skipped, and a real failure still reads failed."""
    skipped = {"state": "verified", "fs": "ext4",
               "check": {"ok": None, "rc": None, "skipped": "room", "summary": "not checked: no room"}}
    assert _check_text(skipped) == "ext4 not checked: no room"
    failed = {"state": "verified", "fs": "ext4", "check": {"ok": False, "rc": 4, "summary": "errors"}}
    assert _check_text(failed) == "ext4 failed (rc 4): errors"
    assert _check_text({"state": "verified", "fs": "xfs", "check": {"ok": True, "rc": 0}}) == "xfs ok"
